"""coop_min: minimal CLIP, CoOp and CoCoOp in pure PyTorch."""
__version__ = "0.1.0"
