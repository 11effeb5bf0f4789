"""Triton kernels with PyTorch reference twins (installed as coop_min.kernels).

cosine_ce: fused L2-normalise + cosine logits + softmax cross-entropy, forward and backward.
elementwise: fused fp32 LayerNorm and QuickGELU for a frozen 16-bit CLIP, forward and backward.
attention: causal self-attention for CLIP's short text sequences (L <= 77), with an optional shared
  prefix of keys and values, forward and backward.
"""
