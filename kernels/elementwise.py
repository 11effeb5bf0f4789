"""Fused LayerNorm and QuickGELU for a frozen bf16/fp16 CLIP: one kernel where PyTorch runs several.

At CoOp's sizes the text encoder's step moves more bytes through elementwise ops than through its
matmuls (`bench.py --cost` counts them; docs/performance.md). Two ops move most of it, because CLIP
computes them the careful way:

- LayerNorm in fp32 on a 16-bit input, cast back (OpenAI's LayerNorm): x.float(), layer_norm, .to(),
  three kernels and 20 bytes per element forward; backward casts the gradient and the input to fp32,
  runs layer_norm_backward and casts back, about 30 bytes per element.
- QuickGELU x * sigmoid(1.702 x): three kernels and 14 bytes per element forward, seven kernels and
  about 34 bytes per element in backward (clip.QuickGELU recomputes the sigmoid to save memory).

Here each is one kernel per direction reading each input once and writing once (LayerNorm 4 bytes
per element forward, 6 backward; QuickGELU 4 and 6), with fp32 arithmetic and one rounding, as the
careful versions (their intermediate bf16 roundings are gone, so results may differ from them by
one unit in the last place). Backward keeps what clip.py's memory-lean versions keep: the 16-bit
input, and for LayerNorm the fp32 mean and 1/std per row. LayerNorm gives no weight gradients: it is
for the frozen CLIP (a trainable weight or bias runs the twin).

Dispatch as kernels/cosine_ce.py: CUDA tensors run the kernels, CPU tensors the PyTorch twins,
unless TRITON_INTERPRET=1 was set before triton was imported.
"""
import torch
import torch.nn.functional as F

from .cosine_ce import tl, triton, use_triton, jit

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels

@jit
def _layer_norm_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, W, eps,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)                # one row of W elements per program
    cols = tl.arange(0, BLOCK_W)
    mask = cols < W
    x = tl.load(x_ptr + row * W + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / W
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / W + eps)
    y = xc * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * W + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@jit
def _layer_norm_backward_kernel(x_ptr, w_ptr, g_ptr, mean_ptr, rstd_ptr, dx_ptr, W,
                                HAS_W: tl.constexpr, BLOCK_W: tl.constexpr):
    # dx = rstd (wg - mean(wg) - xhat mean(wg xhat)), wg = w * g, xhat = (x - mean) rstd
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    mask = cols < W
    x = tl.load(x_ptr + row * W + cols, mask=mask, other=0.0).to(tl.float32)
    wg = tl.load(g_ptr + row * W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        wg = wg * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
    c_xhat = tl.sum(wg * xhat, axis=0) / W
    c_mean = tl.sum(wg, axis=0) / W
    dx = (wg - xhat * c_xhat - c_mean) * rstd
    tl.store(dx_ptr + row * W + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@jit
def _quick_gelu_forward_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.sigmoid(1.702 * x)
    tl.store(y_ptr + i, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _quick_gelu_backward_kernel(x_ptr, g_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    # d/dx x s(1.702 x) = s + 1.702 x s (1 - s)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(1.702 * x)
    dx = g * (s + 1.702 * x * s * (1.0 - s))
    tl.store(dx_ptr + i, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launches

_GELU_BLOCK = 1024


def _row_launch(W: int) -> dict:
    block = triton.next_power_of_2(W)
    return {"BLOCK_W": block, "num_warps": min(max(block // 256, 1), 8)}   # 512 wide: 2 warps, 8 each


def _layer_norm_forward(x, w, b, eps):  # x (N, W) contiguous -> y (N, W), mean (N,), rstd (N,) fp32
    N, W = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _layer_norm_forward_kernel[(N,)](x, w, b, y, mean, rstd, W, eps, HAS_W=w is not None,
                                     HAS_B=b is not None, **_row_launch(W))
    return y, mean, rstd


def _layer_norm_backward(g, x, w, mean, rstd):  # all (N, W) contiguous but the row stats -> dx
    N, W = x.shape
    dx = torch.empty_like(x)
    _layer_norm_backward_kernel[(N,)](x, w, g, mean, rstd, dx, W, HAS_W=w is not None, **_row_launch(W))
    return dx


def _quick_gelu_forward(x):
    y = torch.empty_like(x)
    _quick_gelu_forward_kernel[(triton.cdiv(x.numel(), _GELU_BLOCK),)](x, y, x.numel(), BLOCK=_GELU_BLOCK)
    return y


def _quick_gelu_backward(g, x):
    dx = torch.empty_like(x)
    _quick_gelu_backward_kernel[(triton.cdiv(x.numel(), _GELU_BLOCK),)](x, g, dx, x.numel(), BLOCK=_GELU_BLOCK)
    return dx


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, eps):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()          # (N, W)
        y, mean, rstd = _layer_norm_forward(x, w, b, eps)
        ctx.save_for_backward(x, w, mean, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x, w, mean, rstd = ctx.saved_tensors
        dx = _layer_norm_backward(grad.reshape(x.shape).contiguous(), x, w, mean, rstd)
        return dx.view(grad.shape), None, None, None


class _QuickGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return _quick_gelu_forward(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return _quick_gelu_backward(grad.contiguous(), x)


# ----------------------------------------------------------------------------- public API

def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension in fp32, returned in x's dtype: x (..., W), weight and bias
    (W,) (fp32 as clip.convert_dtype keeps them) or None. Differentiable in x only; a weight or bias
    that requires grad runs the twin."""
    W = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (W,):
            raise ValueError(f"layer_norm {name} must have shape ({W},) for x {tuple(x.shape)}, got {tuple(p.shape)}")
    trainable = any(p is not None and p.requires_grad for p in (weight, bias)) and torch.is_grad_enabled()
    if x.dtype not in _DTYPES or x.numel() == 0 or trainable or not use_triton(x):
        return layer_norm_reference(x, weight, bias, eps)
    w = None if weight is None else weight.detach().float().contiguous()
    b = None if bias is None else bias.detach().float().contiguous()
    return _LayerNorm.apply(x, w, b, float(eps))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) in fp32, returned in x's dtype; differentiable."""
    if x.dtype not in _DTYPES or x.numel() == 0 or not use_triton(x):
        return quick_gelu_reference(x)
    return _QuickGELU.apply(x)


def layer_norm_reference(x, weight, bias, eps=1e-5):
    """The PyTorch twin of layer_norm: OpenAI's LayerNorm (fp32 compute, cast back)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)


def quick_gelu_reference(x):
    """The PyTorch twin of quick_gelu: OpenAI's QuickGELU."""
    return x * torch.sigmoid(1.702 * x)
