"""Triton kernels with PyTorch reference twins (installed as coop_min.kernels)."""
