"""CLIP weights (installed as coop_min.weights): the checkpoint converter and the bundled tiny demo CLIP.

    python -m coop_min.weights.convert SRC DST.safetensors     # or: python weights/convert.py ...
"""
