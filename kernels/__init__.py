"""Triton kernels with PyTorch reference twins (installed as coop_min.kernels).

cosine_ce: fused L2-normalise + cosine logits + softmax cross-entropy, forward and backward.
"""
