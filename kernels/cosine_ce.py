"""Fused cosine-similarity classifier head: L2-normalise, scaled cosine logits, cross-entropy.

For image features f (B, D), text features t (C, D) shared by all images (CoOp) or (B, C, D), one
set per image (CoCoOp), a scale s (0-dim tensor, CLIP's logit_scale.exp()) and labels y (B,):

    u_ic  = f_i.t_c / (|f_i| |t_c|)         cosine; norms clamped at 1e-12 like F.normalize
    z_ic  = s u_ic                          logits
    lse_i = log sum_c exp(z_ic)             online over class tiles, as in flash attention
    loss  = mean over rows with y_i != ignore_index of (lse_i - z_iy_i)   (nan if none, as PyTorch)

Backward, with n the number of kept rows, g the incoming gradient and x^ = x/|x|
(whose chain rule is dx = (dx^ - x^ (x^.dx^)) / |x|):

    dz_ic = g/n (softmax_ic - [c == y_i])   0 for ignored rows; softmax_ic = exp(z_ic - lse_i)
    ds    = sum_ic dz_ic u_ic
    df_i  = s (sum_c dz_ic t^_c - f^_i sum_c dz_ic u_ic) / |f_i|
    dt_c  = s (sum_i dz_ic f^_i - t^_c sum_i dz_ic u_ic) / |t_c|    (per image: no sum over i)

Memory: the PyTorch twin keeps fp32 normalised copies of f and t (for CoCoOp t is (B, C, D)), the
(B, C) logits and the (B, C) log-softmax for backward. Here only lse (B,) is saved: norms cost no
extra loads (they are summed in the same D loop as the dot products) and the softmax is recomputed
tile by tile from z and lse in backward. Nothing of size B x C or B x C x D is written but dt.

Kernels (all accumulate in fp32, fp64 for fp64 inputs):
- _forward_kernel: grid (row tiles, class splits); each program runs the online lse over its share
  of class tiles, so a small batch still fills the GPU. _finish_kernel merges the splits, writes
  lse and the mean loss and counts out-of-range labels (checked with one .item(), unless the
  caller checked the labels on the host: check_labels=False).
- _backward_rows_kernel: grid (row tiles, D chunks): df, sum_c dz u (for ds) and, per image, dt.
- _backward_cols_kernel: grid (class tiles, D chunks), looping over image tiles: the shared dt
  summed over images without atomics.
- _logits_kernel: inference logits in one launch instead of the twin's normalise/matmul/scale.

Dispatch: CUDA tensors run the kernels, CPU tensors the PyTorch twin, unless TRITON_INTERPRET=1 was
set before triton was imported: then the kernels run on CPU in Triton's interpreter (for tests).
"""
import functools
import os
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    jit = triton.jit                     # kernels/elementwise.py uses it too
except ImportError:  # CPU-only platforms: the twins work, use_triton() says what is missing
    triton = None
    tl = SimpleNamespace(constexpr=lambda value=None: value)  # lets the kernels below be defined
    jit = lambda fn: fn  # noqa: E731

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, like triton.jit does
# Triton's interpreter (3.9) multiplies the raw bits of bf16 operands in tl.dot: upcast there.
_UPCAST_DOT = tl.constexpr(_INTERPRET)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- kernels

@jit
def _norm(sumsq):
    """|x| from sum(x*x), clamped at 1e-12 like F.normalize."""
    return tl.maximum(tl.sqrt(sumsq), 1e-12)


@jit
def _sumsq_rows(x_ptr, rows, n_rows, D, s_r, s_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC: tl.constexpr):
    sq = tl.zeros((BLOCK_R,), ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = (rows[:, None] < n_rows) & (d[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * s_r + d[None, :] * s_d, mask=mask, other=0.0).to(ACC)
        sq += tl.sum(x * x, axis=1)
    return sq


@jit
def _mma(a, b, acc, ACC: tl.constexpr):
    """acc + a @ b accumulated in ACC. Two 16-bit operands: tensor cores (their products are exact
    in fp32). An fp32 gradient tile times bf16 features: the tile is cast to bf16, as flash
    attention casts p. Anything else (fp16 features, whose range flushes small gradients): ACC."""
    if _UPCAST_DOT:
        return tl.dot(a.to(ACC), b.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
    if a.dtype == b.dtype:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    if b.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.bfloat16), b, acc, out_dtype=ACC)
    return tl.dot(a.to(ACC), b.to(ACC), acc, input_precision="ieee", out_dtype=ACC)


@jit
def _dots(f_ptr, t_ptr, rows, cols, B, C, D, s_fb, s_fd, s_tb, s_tc, s_td,
          PER_IMAGE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Raw dots f[rows].t[cols] (BLOCK_B, BLOCK_C) and the squared t norms, in chunks of D."""
    dots = tl.zeros((BLOCK_B, BLOCK_C), ACC)
    if PER_IMAGE:
        sq_t = tl.zeros((BLOCK_B, BLOCK_C), ACC)
    else:
        sq_t = tl.zeros((1, BLOCK_C), ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        f_mask = (rows[:, None] < B) & (d[None, :] < D)
        fx = tl.load(f_ptr + rows[:, None] * s_fb + d[None, :] * s_fd, mask=f_mask, other=0.0)
        if PER_IMAGE:  # a matrix-vector product per image: no reuse, so no tensor cores
            t_off = (rows[:, None, None] * s_tb + cols[None, :, None] * s_tc
                     + d[None, None, :] * s_td)
            t_mask = f_mask[:, None, :] & (cols[None, :, None] < C)
            tx = tl.load(t_ptr + t_off, mask=t_mask, other=0.0).to(ACC)  # (BB, BC, BD)
            fa = fx.to(ACC)
            dots += tl.sum(fa[:, None, :] * tx, axis=2)
            sq_t += tl.sum(tx * tx, axis=2)
        else:
            t_mask = (cols[:, None] < C) & (d[None, :] < D)
            tx = tl.load(t_ptr + cols[:, None] * s_tc + d[None, :] * s_td, mask=t_mask, other=0.0)
            dots = _mma(fx, tl.trans(tx), dots, ACC)
            ta = tx.to(ACC)
            sq_t += tl.sum(ta * ta, axis=1)[None, :]
    return dots, sq_t


@jit
def _grad_logits(u, s, lse, y, coef, cols, C):
    """dL/dz for a tile: coef_i (softmax_ic - [c == y_i]), softmax recomputed from the saved lse."""
    p = tl.exp(s * u - lse[:, None])
    dz = coef[:, None] * (p - tl.where(cols[None, :] == y[:, None], 1.0, 0.0))
    return tl.where(cols[None, :] < C, dz, 0.0)


@jit
def _forward_kernel(f_ptr, t_ptr, scale_ptr, labels_ptr, lse_ptr, target_ptr,
                    B, C, D, s_fb, s_fd, s_tb, s_tc, s_td, classes_per_split, ignore_index,
                    PER_IMAGE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Partial lse and target logit of one row tile over one split of the classes."""
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    s = tl.load(scale_ptr).to(ACC)
    y = tl.load(labels_ptr + rows, mask=rows < B, other=ignore_index)
    nf = _norm(_sumsq_rows(f_ptr, rows, B, D, s_fb, s_fd, BLOCK_B, BLOCK_D, ACC))
    m = tl.full((BLOCK_B,), float("-inf"), ACC)  # running max
    l = tl.zeros((BLOCK_B,), ACC)  # running sum of exp(z - m)
    z_y = tl.zeros((BLOCK_B,), ACC)
    start = split * classes_per_split  # every split starts below C, so m is finite after a tile
    for c0 in range(start, start + classes_per_split, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        dots, sq_t = _dots(f_ptr, t_ptr, rows, cols, B, C, D, s_fb, s_fd, s_tb, s_tc, s_td,
                           PER_IMAGE, BLOCK_B, BLOCK_C, BLOCK_D, ACC)
        z = s * dots / (nf[:, None] * _norm(sq_t))
        z = tl.where(cols[None, :] < C, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    tl.store(lse_ptr + split * B + rows, m + tl.log(l), mask=rows < B)
    tl.store(target_ptr + split * B + rows, z_y, mask=rows < B)


@jit
def _finish_kernel(lse_part_ptr, target_part_ptr, labels_ptr, lse_ptr, loss_ptr, n_kept_ptr,
                   n_bad_ptr, B, C, splits, ignore_index, BLOCK_S: tl.constexpr,
                   BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One program: merge the splits into lse (B,), the mean loss, and count kept and bad labels."""
    total = tl.zeros((BLOCK,), ACC)
    kept = tl.zeros((BLOCK,), tl.int32)
    bad = tl.zeros((BLOCK,), tl.int32)
    sp = tl.arange(0, BLOCK_S)
    for r0 in range(0, B, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        offs = sp[:, None] * B + rows[None, :]
        mask = (sp[:, None] < splits) & (rows[None, :] < B)
        part = tl.load(lse_part_ptr + offs, mask=mask, other=0.0)  # (BLOCK_S, BLOCK)
        part = tl.where(sp[:, None] < splits, part, float("-inf"))
        m = tl.max(part, axis=0)
        lse = m + tl.log(tl.sum(tl.exp(part - m[None, :]), axis=0))
        tl.store(lse_ptr + rows, lse, mask=rows < B)
        z_y = tl.sum(tl.load(target_part_ptr + offs, mask=mask, other=0.0), axis=0)
        y = tl.load(labels_ptr + rows, mask=rows < B, other=ignore_index)
        keep = y != ignore_index
        total += tl.where(keep, lse - z_y, 0.0)
        kept += keep.to(tl.int32)
        bad += (keep & ((y < 0) | (y >= C))).to(tl.int32)
    n_kept = tl.sum(kept).to(ACC)
    tl.store(loss_ptr, tl.sum(total) / n_kept)  # 0/0 = nan when all rows are ignored, as in PyTorch
    tl.store(n_kept_ptr, n_kept)
    tl.store(n_bad_ptr, tl.sum(bad))


@jit
def _backward_rows_kernel(f_ptr, t_ptr, scale_ptr, labels_ptr, lse_ptr, grad_ptr, n_kept_ptr,
                          df_ptr, dt_ptr, row_dot_ptr,
                          B, C, D, s_fb, s_fd, s_tb, s_tc, s_td, ignore_index,
                          PER_IMAGE: tl.constexpr, WRITE_DF: tl.constexpr, WRITE_DT: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr, ACC: tl.constexpr):
    """df for one row tile and one D chunk, sum_c dz u per row (for ds), and the per-image dt."""
    pid_d = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)  # the D chunk this program writes
    s = tl.load(scale_ptr).to(ACC)
    y = tl.load(labels_ptr + rows, mask=rows < B, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=rows < B, other=0.0)
    coef = tl.load(grad_ptr).to(ACC) / tl.load(n_kept_ptr)  # dL/dloss_i of a kept row
    coef = tl.where(y != ignore_index, coef, 0.0)
    sq_f = _sumsq_rows(f_ptr, rows, B, D, s_fb, s_fd, BLOCK_B, BLOCK_D, ACC)
    nf = _norm(sq_f)
    f_mask = (rows[:, None] < B) & (do[None, :] < D)
    f_hat = tl.load(f_ptr + rows[:, None] * s_fb + do[None, :] * s_fd, mask=f_mask, other=0.0)
    f_hat = f_hat.to(ACC) / nf[:, None]  # (BB, BDO)
    acc = tl.zeros((BLOCK_B, BLOCK_DO), ACC)  # sum_c dz_ic t_c / |t_c|
    row_dot = tl.zeros((BLOCK_B,), ACC)  # sum_c dz_ic u_ic
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        dots, sq_t = _dots(f_ptr, t_ptr, rows, cols, B, C, D, s_fb, s_fd, s_tb, s_tc, s_td,
                           PER_IMAGE, BLOCK_B, BLOCK_C, BLOCK_D, ACC)
        nt = _norm(sq_t)
        u = dots / (nf[:, None] * nt)
        dz = _grad_logits(u, s, lse, y, coef, cols, C)
        row_dot += tl.sum(dz * u, axis=1)
        g = dz / nt
        if PER_IMAGE:
            t_off = (rows[:, None, None] * s_tb + cols[None, :, None] * s_tc
                     + do[None, None, :] * s_td)
            t_mask = f_mask[:, None, :] & (cols[None, :, None] < C)
            tx = tl.load(t_ptr + t_off, mask=t_mask, other=0.0).to(ACC)  # (BB, BC, BDO)
            if WRITE_DF:
                acc += tl.sum(g[:, :, None] * tx, axis=1)
            if WRITE_DT:  # dt_ic = s dz_ic (f^_i - u_ic t^_ic) / |t_ic|
                u_kept = tl.where(sq_t > 1e-24, u, 0.0)  # below eps the norm is a constant
                t_hat = tx / nt[:, :, None]
                dt = s * g[:, :, None] * (f_hat[:, None, :] - u_kept[:, :, None] * t_hat)
                tl.store(dt_ptr + t_off, dt, mask=t_mask)
        elif WRITE_DF:
            t_mask = (cols[:, None] < C) & (do[None, :] < D)
            tx = tl.load(t_ptr + cols[:, None] * s_tc + do[None, :] * s_td, mask=t_mask, other=0.0)
            acc = _mma(g, tx, acc, ACC)
    if WRITE_DF:
        row_kept = tl.where(sq_f > 1e-24, row_dot, 0.0)
        df = s * (acc - f_hat * row_kept[:, None]) / nf[:, None]
        tl.store(df_ptr + rows[:, None] * s_fb + do[None, :] * s_fd, df, mask=f_mask)
    if pid_d == 0:
        tl.store(row_dot_ptr + rows, row_dot, mask=rows < B)


@jit
def _backward_cols_kernel(f_ptr, t_ptr, scale_ptr, labels_ptr, lse_ptr, grad_ptr, n_kept_ptr,
                          dt_ptr,
                          B, C, D, s_fb, s_fd, s_tc, s_td, ignore_index,
                          BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr, ACC: tl.constexpr):
    """dt of shared text features for one class tile and D chunk, summed over all image tiles."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    s = tl.load(scale_ptr).to(ACC)
    coef_kept = tl.load(grad_ptr).to(ACC) / tl.load(n_kept_ptr)  # dL/dloss_i of a kept row
    sq_t = _sumsq_rows(t_ptr, cols, C, D, s_tc, s_td, BLOCK_C, BLOCK_D, ACC)
    nt = _norm(sq_t)
    acc = tl.zeros((BLOCK_C, BLOCK_DO), ACC)  # sum_i dz_ic f_i / |f_i|
    col_dot = tl.zeros((BLOCK_C,), ACC)  # sum_i dz_ic u_ic
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        y = tl.load(labels_ptr + rows, mask=rows < B, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=rows < B, other=0.0)
        coef = tl.where(y != ignore_index, coef_kept, 0.0)
        nf = _norm(_sumsq_rows(f_ptr, rows, B, D, s_fb, s_fd, BLOCK_B, BLOCK_D, ACC))
        dots, _ = _dots(f_ptr, t_ptr, rows, cols, B, C, D, s_fb, s_fd, 0, s_tc, s_td,
                        False, BLOCK_B, BLOCK_C, BLOCK_D, ACC)
        u = dots / (nf[:, None] * nt[None, :])
        dz = _grad_logits(u, s, lse, y, coef, cols, C)
        col_dot += tl.sum(dz * u, axis=0)
        f_mask = (rows[:, None] < B) & (do[None, :] < D)
        fx = tl.load(f_ptr + rows[:, None] * s_fb + do[None, :] * s_fd, mask=f_mask, other=0.0)
        acc = _mma(tl.trans(dz / nf[:, None]), fx, acc, ACC)
    t_mask = (cols[:, None] < C) & (do[None, :] < D)
    t_off = cols[:, None] * s_tc + do[None, :] * s_td
    t_hat = tl.load(t_ptr + t_off, mask=t_mask, other=0.0).to(ACC) / nt[:, None]
    col_kept = tl.where(sq_t > 1e-24, col_dot, 0.0)
    dt = s * (acc - t_hat * col_kept[:, None]) / nt[:, None]
    tl.store(dt_ptr + t_off, dt, mask=t_mask)


@jit
def _logits_kernel(f_ptr, t_ptr, scale_ptr, out_ptr, B, C, D, s_fb, s_fd, s_tb, s_tc, s_td,
                   PER_IMAGE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = tl.load(scale_ptr).to(ACC)
    nf = _norm(_sumsq_rows(f_ptr, rows, B, D, s_fb, s_fd, BLOCK_B, BLOCK_D, ACC))
    dots, sq_t = _dots(f_ptr, t_ptr, rows, cols, B, C, D, s_fb, s_fd, s_tb, s_tc, s_td,
                       PER_IMAGE, BLOCK_B, BLOCK_C, BLOCK_D, ACC)
    z = s * dots / (nf[:, None] * _norm(sq_t))
    mask = (rows[:, None] < B) & (cols[None, :] < C)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], z, mask=mask)


# ----------------------------------------------------------------------------- launch

@dataclass(frozen=True)
class _Tiles:
    block_b: int  # images per program
    block_c: int  # classes per tile
    block_d: int  # D chunk of the dot-product loop
    block_do: int  # D chunk of a gradient a program writes
    num_warps: int


def _tiles(B: int, D: int, per_image: bool) -> _Tiles:
    # Measured on an H100 at CLIP sizes (B=32, C=1000, D=512/1024; CoCoOp B=1..32, C=50..100):
    # wider class tiles or D chunks spill registers in the backward kernels. _backward_cols_kernel
    # takes 16 classes per tile for fp32 (see _backward).
    if per_image:  # t is read once per image either way: one image per program, (1, BC, BD) tiles
        return _Tiles(1, 32, _pow2_at_most(D, 128), _pow2_at_most(D, 256), num_warps=4)
    # tl.dot wants >= 16 rows; 16 images per tile keeps enough programs for a small batch
    return _Tiles(16, 32, _pow2_at_most(D, 64), _pow2_at_most(D, 128), num_warps=4)


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _geometry(f: torch.Tensor, t: torch.Tensor) -> tuple:
    """(B, C, D, f strides, t strides with a 0 image stride for shared t)."""
    B, D = f.shape
    s_tb = t.stride(0) if t.dim() == 3 else 0
    return (B, t.shape[-2], D, f.stride(0), f.stride(1), s_tb, t.stride(-2), t.stride(-1))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tl_acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(n_btiles: int, n_ctiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, class tiles per split): enough programs for two per SM, each over whole tiles."""
    splits = min(n_ctiles, max(1, triton.cdiv(2 * _num_sms(device), n_btiles)))
    tiles_per_split = triton.cdiv(n_ctiles, splits)
    return triton.cdiv(n_ctiles, tiles_per_split), tiles_per_split


def _forward(f, t, scale, labels, ignore_index):
    """Mean loss, per-row lse (B,), the kept-row count and the count of out-of-range labels."""
    geo = _geometry(f, t)
    B, C, D = geo[:3]
    tiles = _tiles(B, D, t.dim() == 3)
    acc = _acc_dtype(f)
    n_btiles = triton.cdiv(B, tiles.block_b)
    splits, tiles_per_split = _num_splits(n_btiles, triton.cdiv(C, tiles.block_c), f.device)
    part = torch.empty(2, splits, B, dtype=acc, device=f.device)  # partial lse, target logit
    _forward_kernel[(n_btiles, splits)](
        f, t, scale, labels, part[0], part[1], *geo, tiles_per_split * tiles.block_c,
        ignore_index, PER_IMAGE=t.dim() == 3, BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c,
        BLOCK_D=tiles.block_d, ACC=_tl_acc(f), num_warps=tiles.num_warps)
    lse = torch.empty(B, dtype=acc, device=f.device)
    loss = torch.empty((), dtype=acc, device=f.device)
    n_kept = torch.empty((), dtype=acc, device=f.device)
    n_bad = torch.empty((), dtype=torch.int32, device=f.device)
    block_s = triton.next_power_of_2(splits)
    _finish_kernel[(1,)](part[0], part[1], labels, lse, loss, n_kept, n_bad, B, C, splits,
                         ignore_index, BLOCK_S=block_s, ACC=_tl_acc(f),
                         BLOCK=max(1, min(triton.next_power_of_2(B), 4096 // block_s)))
    return loss, lse, n_kept, n_bad


def _backward(grad_loss, f, t, scale, labels, lse, n_kept, ignore_index, needs):
    geo = _geometry(f, t)
    B, C, D = geo[:3]
    per_image = t.dim() == 3
    tiles = _tiles(B, D, per_image)
    need_f, need_t, need_s = needs
    df = torch.empty_like(f) if need_f else None
    dt = torch.empty_like(t) if need_t else None
    ds = None
    blocks = dict(BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c, BLOCK_D=tiles.block_d,
                  BLOCK_DO=tiles.block_do, ACC=_tl_acc(f), num_warps=tiles.num_warps)
    n_dtiles = triton.cdiv(D, tiles.block_do)
    if need_f or need_s or (need_t and per_image):
        row_dot = torch.empty(B, dtype=lse.dtype, device=f.device)  # sum_c dz_ic u_ic
        _backward_rows_kernel[(triton.cdiv(B, tiles.block_b), n_dtiles)](
            f, t, scale, labels, lse, grad_loss, n_kept, f if df is None else df,
            t if dt is None else dt, row_dot, *geo, ignore_index, PER_IMAGE=per_image,
            WRITE_DF=need_f, WRITE_DT=need_t and per_image, **blocks)
        ds = row_dot.sum().to(scale.dtype) if need_s else None  # ds = sum_ic dz_ic u_ic
    if need_t and not per_image:
        # fp32 inputs: with 32 classes per tile ptxas spilled this kernel under triton 3.8 (not
        # 3.9). 16 halve the (BLOCK_C, BLOCK_DO) accumulator and the (BLOCK_B, BLOCK_C) dot tiles
        # and compile without spills under both (tests/test_cosine_ce.py); the dot-product work
        # stays the same, but twice as many programs each reread all of f. Chosen to compile, not
        # timed: its speed on the GPU against 32 classes is yet to be measured.
        block_c = 16 if f.dtype == torch.float32 else tiles.block_c
        _backward_cols_kernel[(triton.cdiv(C, block_c), n_dtiles)](
            f, t, scale, labels, lse, grad_loss, n_kept, dt, B, C, D, f.stride(0), f.stride(1),
            t.stride(0), t.stride(1), ignore_index, **dict(blocks, BLOCK_C=block_c))
    return df, dt, ds


class _CosineCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, f, t, scale, labels, ignore_index, check_labels):
        loss, lse, n_kept, n_bad = _forward(f, t, scale, labels, ignore_index)
        # one sync: a bad label would otherwise give a silently wrong loss (not while a CUDA graph
        # is captured, where a sync is illegal: a graphed step checks its labels on the host)
        capturing = f.is_cuda and torch.cuda.is_current_stream_capturing()
        if check_labels and not capturing and n_bad.item():
            bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= t.shape[-2]))]
            raise ValueError(f"labels must be in [0, {t.shape[-2]}) or {ignore_index}, got "
                             f"{bad[:5].tolist()}")
        ctx.save_for_backward(f, t, scale, labels, lse, n_kept)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        f, t, scale, labels, lse, n_kept = ctx.saved_tensors
        df, dt, ds = _backward(grad_loss, f, t, scale, labels, lse, n_kept, ctx.ignore_index,
                               ctx.needs_input_grad[:3])
        return df, dt, ds, None, None, None


# ----------------------------------------------------------------------------- public API

def use_triton(x: torch.Tensor) -> bool:
    """True for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 was set at import."""
    if not (x.is_cuda or _INTERPRET):
        return False
    if triton is not None:
        return True
    if _INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 asks for the Triton kernels but triton is not "
                           "importable; pip install triton, or unset TRITON_INTERPRET")
    warnings.warn("triton is not importable: the fused kernels (cosine_ce, layer_norm, quick_gelu) run "
                  "their PyTorch twins on CUDA (pip install triton for the kernels)", stacklevel=3)
    return False


def _check(f, t, scale):
    if f.dim() != 2 or t.dim() not in (2, 3) or t.shape[-1] != f.shape[1]:
        raise ValueError(f"cosine head wants f (B, D) and t (C, D) or (B, C, D), got f "
                         f"{tuple(f.shape)} and t {tuple(t.shape)}")
    if t.dim() == 3 and t.shape[0] != f.shape[0]:
        raise ValueError(f"per-image t {tuple(t.shape)} must have B={f.shape[0]} rows like f")
    if 0 in f.shape or t.shape[-2] == 0:
        raise ValueError(f"cosine head needs B, C, D >= 1, got f {tuple(f.shape)}, "
                         f"t {tuple(t.shape)}")
    if f.dtype != t.dtype or f.dtype not in _DTYPES:
        raise TypeError(f"f and t need one dtype of {_DTYPES}, got {f.dtype} and {t.dtype}; "
                        "cast one")
    if not torch.is_tensor(scale) or scale.numel() != 1 or scale.device != f.device:
        raise TypeError(f"scale must be a 1-element tensor on {f.device} (logit_scale.exp()), "
                        f"got {scale!r}")


def cosine_ce(f: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
              ignore_index: int = -100, check_labels: bool = True) -> torch.Tensor:
    """Mean cross-entropy of scale * cos(f, t) logits; 0-dim fp32 (fp64 for fp64 inputs).

    check_labels=False skips the kernels' label range check, the step's one host sync, for a caller
    that checked the labels on the host (an out-of-range label then gives a wrong loss, not an error)."""
    _check(f, t, scale)
    if labels.shape != (f.shape[0],) or labels.dtype != torch.long:
        raise ValueError(f"labels must be a long tensor of shape ({f.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if not use_triton(f):
        return cosine_ce_reference(f, t, scale, labels, ignore_index)
    return _CosineCE.apply(f, t, scale.reshape(()), labels.contiguous(), ignore_index, check_labels)


def cosine_logits(f: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inference logits scale * cos(f_i, t_c): (B, C) fp32 (fp64 for fp64 inputs), no autograd."""
    _check(f, t, scale)
    if not use_triton(f):
        return cosine_logits_reference(f, t, scale)
    if torch.is_grad_enabled() and (f.requires_grad or t.requires_grad or scale.requires_grad):
        raise RuntimeError("cosine_logits has no backward: call it under torch.no_grad(), or "
                           "train with cosine_ce")
    geo = _geometry(f, t)
    B, C, D = geo[:3]
    tiles = _tiles(B, D, t.dim() == 3)
    out = torch.empty(B, C, dtype=_acc_dtype(f), device=f.device)
    grid = (triton.cdiv(B, tiles.block_b), triton.cdiv(C, tiles.block_c))
    _logits_kernel[grid](f, t, scale, out, *geo, PER_IMAGE=t.dim() == 3, BLOCK_B=tiles.block_b,
                         BLOCK_C=tiles.block_c, BLOCK_D=tiles.block_d, ACC=_tl_acc(f),
                         num_warps=tiles.num_warps)
    return out


def cosine_logits_reference(f: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The PyTorch twin of cosine_logits, differentiable."""
    acc = _acc_dtype(f)
    f = F.normalize(f.to(acc), dim=-1)  # (B, D)
    t = F.normalize(t.to(acc), dim=-1)  # (C, D) or (B, C, D)
    cos = f @ t.t() if t.dim() == 2 else torch.einsum("bd,bcd->bc", f, t)  # (B, C)
    return scale.to(acc) * cos


def cosine_ce_reference(f: torch.Tensor, t: torch.Tensor, scale: torch.Tensor,
                        labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The PyTorch twin of cosine_ce."""
    return F.cross_entropy(cosine_logits_reference(f, t, scale), labels, ignore_index=ignore_index)
