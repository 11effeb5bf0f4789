"""Causal self-attention for short sequences (CLIP's text, L <= 77), forward and backward.

For one sequence and head: queries q (L, Dh); keys and values k, v (K, Dh), K = P + L, the P keys of
a prefix the sequence continues (P = 0 without one) then its own L keys; c = 1/sqrt(Dh) (SDPA's):

    s_ij = c q_i.k_j                     for j <= P + i (a query sees the prefix and its own past)
    p_ij = exp(s_ij - m_i) / l_i         m_i = max_j s_ij, l_i = sum_j exp(s_ij - m_i)
    o_i  = sum_j p_ij v_j

Backward, with g_i = dL/do_i:

    dv_j  = sum_i p_ij g_i
    dp_ij = g_i.v_j
    ds_ij = p_ij (dp_ij - sum_j p_ij dp_ij)       (the sum is g_i.o_i, flash attention's D_i)
    dq_i  = c sum_j ds_ij k_j,   dk_j = c sum_i ds_ij q_i

Tiles: at L <= 77 the whole L x K score tile of one (sequence, head) fits in registers, so each
direction is one pass with no online softmax: one program per (sequence, head), BLOCK_Q =
next_power_of_2(L) query rows and BLOCK_K = next_power_of_2(P + L) <= 128 key rows (both >= 16, the
least tl.dot takes), Dh padded to a power of two. The grid runs the heads of a sequence in adjacent
programs: with q, k, v as views of one packed qkv they share cache lines. Nothing is saved for
backward but the inputs: it recomputes p from q and k (the row max and sum are one reduction each
over a tile already in registers) and takes D_i as sum_j p_ij dp_ij, so o is not read back either.
Two 16-bit tiles multiply on tensor cores with fp32 accumulation; an fp32 tile (p, ds) times a bf16
one is cast to bf16 first, as flash attention casts p; everything else (fp32 inputs, fp16 gradient
tiles, whose range flushes small values) multiplies in IEEE fp32. Softmax and ds are fp32.

Layout: q, k, v (N, H, L, Dh) sharing one set of strides with a unit last stride, as the
(N, L, 3, H, Dh) packed-qkv views that clip.py makes (no copy); others are made contiguous. The
output and dq, dk, dv are (N, L, H, Dh) buffers returned as (N, H, L, Dh) views, so the caller's
`y.transpose(1, 2).reshape(N, L, H * Dh)` is free. `causal_attention_packed` takes the packed qkv
itself and writes dq, dk, dv into one (N, L, 3, H, Dh) gradient: given three views, autograd would
stack their gradients and copy the stack back into the projection's layout, two more passes.

Prefix (coop_min/fast.py's shared prefix): prefix_k, prefix_v (G, H, P, Dh); group (N,) long picks
each sequence's prefix (None: G must be 1); group values are not checked (that would cost a host
read), so they must lie in [0, G). Their gradients: each program writes its (P, Dh) share in fp32 to
an (N, H, P, Dh) buffer that is then summed over sequences (index_add_ per group) in fp32 and cast:
deterministic, and the same fp32 sum fast.py's gather gives, with no atomics.

Dispatch as kernels/cosine_ce.py: CUDA tensors run the kernels, CPU tensors the PyTorch twin, unless
TRITON_INTERPRET=1 was set before triton was imported. Shapes and dtypes outside the kernels' range
(fp64, K > 128, Dh > 128) run the twin.
"""
import math
import os

import torch

from .cosine_ce import jit, tl, triton, use_triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK = 128                             # K and Dh the one-tile kernels take
# Triton's interpreter (3.9) multiplies the raw bits of bf16 operands in tl.dot: upcast there.
_UPCAST_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


# ----------------------------------------------------------------------------- kernels

@jit
def _dot(a, b):
    """a @ b accumulated in fp32 (the operand rules are in the module docstring)."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if a.dtype == b.dtype and a.dtype != tl.float32:
        return tl.dot(a, b)
    if b.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.bfloat16), b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@jit
def _load_keys(x_ptr, px_ptr, x_base, px_base, s_l, s_pl, kcols, d, L, P, D,
               HAS_PREFIX: tl.constexpr):
    """The (BLOCK_K, BLOCK_D) tile [prefix rows 0..P-1; own rows 0..L-1] of keys or values."""
    own = kcols - P
    mask = (own[:, None] >= 0) & (own[:, None] < L) & (d[None, :] < D)
    x = tl.load(x_ptr + x_base + own[:, None] * s_l + d[None, :], mask=mask, other=0.0)
    if HAS_PREFIX:
        p_mask = (kcols[:, None] < P) & (d[None, :] < D)
        x += tl.load(px_ptr + px_base + kcols[:, None] * s_pl + d[None, :], mask=p_mask, other=0.0)
    return x


@jit
def _softmax(q, k, rows, kcols, L, P, scale):
    """p (BLOCK_Q, BLOCK_K) fp32: the causal softmax of scale q k^T; padded rows see real keys."""
    s = _dot(q, tl.trans(k)) * (scale * 1.4426950408889634)        # log2(e): exp2 below
    seen = ((kcols[None, :] - P) <= rows[:, None]) & (kcols[None, :] < P + L)
    s = tl.where(seen, s, float("-inf"))                            # key 0 is always seen
    e = tl.exp2(s - tl.max(s, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@jit
def _offsets(group_ptr, s_n, s_h, s_pg, s_ph, HAS_GROUP: tl.constexpr, H: tl.constexpr):
    """(sequence, head, its q/k/v offset, its prefix offset) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // H
    h = pid % H
    g = 0
    if HAS_GROUP:
        g = tl.load(group_ptr + n)
    return n, h, n * s_n + h * s_h, g * s_pg + h * s_ph


@jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, group_ptr, o_ptr,
                    L, P, D, scale, s_n, s_h, s_l, s_pg, s_ph, s_pl,
                    H: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_GROUP: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    n, h, base, p_base = _offsets(group_ptr, s_n, s_h, s_pg, s_ph, HAS_GROUP, H)
    rows = tl.arange(0, BLOCK_Q)
    kcols = tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < L) & (d[None, :] < D)
    q = tl.load(q_ptr + base + rows[:, None] * s_l + d[None, :], mask=q_mask, other=0.0)
    k = _load_keys(k_ptr, pk_ptr, base, p_base, s_l, s_pl, kcols, d, L, P, D, HAS_PREFIX)
    v = _load_keys(v_ptr, pv_ptr, base, p_base, s_l, s_pl, kcols, d, L, P, D, HAS_PREFIX)
    p = _softmax(q, k, rows, kcols, L, P, scale)
    o = _dot(p, v)                                                   # (BLOCK_Q, BLOCK_D) fp32
    o_off = (n * L + rows[:, None]) * (H * D) + h * D + d[None, :]   # (N, L, H, Dh)
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=q_mask)


@jit
def _backward_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, group_ptr, g_ptr,
                     dq_ptr, dk_ptr, dv_ptr, dpk_ptr, dpv_ptr,
                     L, P, D, scale, s_n, s_h, s_l, s_pg, s_ph, s_pl, s_gn, s_gh, s_gl, s_dl,
                     H: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_GROUP: tl.constexpr,
                     WRITE_PREFIX: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    n, h, base, p_base = _offsets(group_ptr, s_n, s_h, s_pg, s_ph, HAS_GROUP, H)
    rows = tl.arange(0, BLOCK_Q)
    kcols = tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < L) & (d[None, :] < D)
    q = tl.load(q_ptr + base + rows[:, None] * s_l + d[None, :], mask=q_mask, other=0.0)
    k = _load_keys(k_ptr, pk_ptr, base, p_base, s_l, s_pl, kcols, d, L, P, D, HAS_PREFIX)
    v = _load_keys(v_ptr, pv_ptr, base, p_base, s_l, s_pl, kcols, d, L, P, D, HAS_PREFIX)
    g_off = n * s_gn + h * s_gh + rows[:, None] * s_gl + d[None, :]
    g = tl.load(g_ptr + g_off, mask=q_mask, other=0.0)              # 0 on padded rows: no gradient
    p = _softmax(q, k, rows, kcols, L, P, scale)
    # each gradient is stored as soon as it is complete, which keeps fewer tiles live at once
    own = kcols - P
    own_mask = (own[:, None] >= 0) & (own[:, None] < L) & (d[None, :] < D)
    own_off = (n * L + own[:, None]) * s_dl + h * D + d[None, :]     # dq, dk, dv: (N, L, [3,] H, Dh)
    p_mask = (kcols[:, None] < P) & (d[None, :] < D)
    p_off = ((n * H + h) * P + kcols[:, None]) * D + d[None, :]      # fp32 (N, H, P, Dh) shares
    dv = _dot(tl.trans(p), g)                                        # (BLOCK_K, BLOCK_D)
    tl.store(dv_ptr + own_off, dv.to(dv_ptr.dtype.element_ty), mask=own_mask)
    if WRITE_PREFIX:
        tl.store(dpv_ptr + p_off, dv, mask=p_mask)
    dp = _dot(g, tl.trans(v))                                        # (BLOCK_Q, BLOCK_K)
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    dq = _dot(ds, k) * scale
    tl.store(dq_ptr + (n * L + rows[:, None]) * s_dl + h * D + d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=q_mask)
    dk = _dot(tl.trans(ds), q) * scale
    tl.store(dk_ptr + own_off, dk.to(dk_ptr.dtype.element_ty), mask=own_mask)
    if WRITE_PREFIX:
        tl.store(dpk_ptr + p_off, dk, mask=p_mask)


# ----------------------------------------------------------------------------- launch

def _blocks(L: int, P: int, D: int, dtype: torch.dtype) -> dict:
    block_k = max(16, triton.next_power_of_2(P + L))
    # bf16 tiles (tensor cores): 4 warps up to 64 keys, 8 at 128, and ptxas keeps every tile in
    # registers. fp32 and fp16 multiply some tiles on CUDA cores, whose layouts take more registers:
    # 8 warps fit K <= 32 and spill beyond it (slower, not wrong; CUDA trains in bf16). The sm_90
    # compile test checks the train shapes.
    warps = 4 if dtype == torch.bfloat16 and block_k <= 64 else 8
    return dict(BLOCK_Q=max(16, triton.next_power_of_2(L)), BLOCK_K=block_k,
                BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=warps)


def _prefix_args(q, prefix_k, prefix_v, group):
    """(pk, pv, group pointers, P, prefix strides) with the q tensor standing in when unused."""
    if prefix_k is None:
        return (q, q, q, 0, 0, 0, 0)
    return (prefix_k, prefix_v, q if group is None else group, prefix_k.shape[2],
            *prefix_k.stride()[:3])


def _forward(q, k, v, prefix_k, prefix_v, group):
    N, H, L, D = q.shape
    pk, pv, grp, P, s_pg, s_ph, s_pl = _prefix_args(q, prefix_k, prefix_v, group)
    o = torch.empty(N, L, H, D, dtype=q.dtype, device=q.device)
    _forward_kernel[(N * H,)](
        q, k, v, pk, pv, grp, o, L, P, D, 1 / math.sqrt(D), *q.stride()[:3], s_pg, s_ph, s_pl,
        H=H, HAS_PREFIX=prefix_k is not None, HAS_GROUP=group is not None, **_blocks(L, P, D, q.dtype))
    return o.transpose(1, 2)                                         # (N, H, L, Dh) view


def _backward(grad, q, k, v, prefix_k, prefix_v, group, write_prefix, dqkv=None):
    """[dq, dk, dv, d prefix_k, d prefix_v]; dqkv: a packed (N, L, 3, H, Dh) buffer to write dq, dk,
    dv into (they are returned as its views), else each gets its own (N, L, H, Dh) buffer."""
    N, H, L, D = q.shape
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    pk, pv, grp, P, s_pg, s_ph, s_pl = _prefix_args(q, prefix_k, prefix_v, group)
    if dqkv is None:
        dq, dk, dv = (torch.empty(N, L, H, D, dtype=q.dtype, device=q.device) for _ in range(3))
    else:
        dq, dk, dv = dqkv.unbind(2)                                  # (N, L, H, Dh) views, rows 3 H Dh apart
    shares = torch.empty(2, N, H, P, D, dtype=torch.float32, device=q.device) if write_prefix else None
    _backward_kernel[(N * H,)](
        q, k, v, pk, pv, grp, grad, dq, dk, dv, *((q, q) if shares is None else shares),
        L, P, D, 1 / math.sqrt(D), *q.stride()[:3], s_pg, s_ph, s_pl, *grad.stride()[:3], dq.stride(1),
        H=H, HAS_PREFIX=prefix_k is not None, HAS_GROUP=group is not None,
        WRITE_PREFIX=write_prefix, **_blocks(L, P, D, q.dtype))
    grads = [dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None]
    if write_prefix:
        if group is None:
            total = shares.sum(1, keepdim=True)                      # (2, 1, H, P, Dh): G == 1
        else:
            total = shares.new_zeros(2, prefix_k.shape[0], H, P, D).index_add_(1, group, shares)
        grads[3:] = total.to(prefix_k.dtype).unbind(0)
    return grads


class _CausalAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, group):
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, group)
        return _forward(q, k, v, prefix_k, prefix_v, group)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, prefix_k, prefix_v, group = ctx.saved_tensors
        write_prefix = prefix_k is not None and any(ctx.needs_input_grad[3:5])
        grads = _backward(grad, q, k, v, prefix_k, prefix_v, group, write_prefix)
        return (*[g if need else None for g, need in zip(grads, ctx.needs_input_grad)], None)


class _PackedCausalAttention(torch.autograd.Function):
    """_CausalAttention on the q, k, v views of one packed qkv (N, L, 3, H, Dh), differentiated in qkv:
    the backward writes dq, dk, dv into one packed gradient, where three views' gradients would be
    stacked by autograd and copied back into the projection's layout."""

    @staticmethod
    def forward(ctx, qkv, prefix_k, prefix_v, group):
        ctx.save_for_backward(qkv, prefix_k, prefix_v, group)
        return _forward(*_unpack(qkv), prefix_k, prefix_v, group)

    @staticmethod
    def backward(ctx, grad):
        qkv, prefix_k, prefix_v, group = ctx.saved_tensors
        write_prefix = prefix_k is not None and any(ctx.needs_input_grad[1:3])
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        _, _, _, dpk, dpv = _backward(grad, *_unpack(qkv), prefix_k, prefix_v, group, write_prefix, dqkv)
        need = ctx.needs_input_grad
        return dqkv if need[0] else None, dpk if need[1] else None, dpv if need[2] else None, None


def _unpack(qkv):  # (N, L, 3, H, Dh) -> q, k, v (N, H, L, Dh) views
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


# ----------------------------------------------------------------------------- public API

def _check(q, k, v, prefix_k, prefix_v, group):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention wants q, k, v of one shape (N, H, L, Dh), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v need one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them")
    if (prefix_k is None) != (prefix_v is None) or (prefix_k is None and group is not None):
        raise ValueError("pass prefix_k and prefix_v together, and group only with them")
    if prefix_k is None:
        return
    N, H, _, D = q.shape
    if prefix_k.dim() != 4 or prefix_v.shape != prefix_k.shape or prefix_k.shape[1::2] != (H, D):
        raise ValueError(f"prefix keys and values must be (G, {H}, P, {D}) for q {tuple(q.shape)}, "
                         f"got {tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    if prefix_k.dtype != q.dtype or prefix_v.dtype != q.dtype:
        raise TypeError(f"prefix keys and values need q's dtype {q.dtype}, got {prefix_k.dtype} "
                        f"and {prefix_v.dtype}; cast them")
    if group is None and prefix_k.shape[0] != 1:
        raise ValueError(f"{prefix_k.shape[0]} prefixes need group (N,) saying which each row uses")
    if group is not None and (group.shape != (N,) or group.dtype != torch.long):
        raise ValueError(f"group must be a long tensor of shape ({N},), got {group.dtype} "
                         f"{tuple(group.shape)}")


def _kernels_take(q, k, v, prefix_k, prefix_v, group):
    """Checks the arguments (errors name the bad one); True where the kernels run them, False where
    the twin does (a CPU tensor without TRITON_INTERPRET, fp64, L + P or Dh over one block, no rows)."""
    _check(q, k, v, prefix_k, prefix_v, group)
    P = 0 if prefix_k is None else prefix_k.shape[2]
    in_range = q.shape[2] + P <= _MAX_BLOCK and q.shape[3] <= _MAX_BLOCK and q.numel() > 0
    return q.dtype in _DTYPES and in_range and use_triton(q)


def _same_strides(*xs):
    """xs unchanged if they share strides with a unit last one, else contiguous copies."""
    if all(x.stride() == xs[0].stride() for x in xs) and xs[0].stride(-1) == 1:
        return xs
    return tuple(x.contiguous() for x in xs)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
                     group: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(Dh)) v: q, k, v (N, H, L, Dh) -> (N, H, L, Dh) in q's dtype.

    Without a prefix, F.scaled_dot_product_attention(q, k, v, is_causal=True). With prefix_k and
    prefix_v (G, H, P, Dh), each row attends to the P keys of prefix group[n] (prefix 0 when group
    is None) before its own, as if they were prepended to it. Differentiable in q, k, v and the
    prefix keys and values."""
    if not _kernels_take(q, k, v, prefix_k, prefix_v, group):
        return causal_attention_reference(q, k, v, prefix_k, prefix_v, group)
    q, k, v = _same_strides(q, k, v)
    if prefix_k is not None:
        prefix_k, prefix_v = _same_strides(prefix_k, prefix_v)
    return _CausalAttention.apply(q, k, v, prefix_k, prefix_v, group)


def causal_attention_packed(qkv: torch.Tensor, prefix_k: torch.Tensor | None = None,
                            prefix_v: torch.Tensor | None = None, group: torch.Tensor | None = None) -> torch.Tensor:
    """causal_attention on q, k, v = the views (N, H, L, Dh) of one packed qkv (N, L, 3, H, Dh), as a
    transformer's in-projection makes it -> (N, H, L, Dh). Where the kernels run, the backward writes
    the gradient of qkv in its layout (no stack of dq, dk, dv and no copy back)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"packed attention wants qkv (N, L, 3, H, Dh), got {tuple(qkv.shape)}")
    q, k, v = _unpack(qkv)
    if not _kernels_take(q, k, v, prefix_k, prefix_v, group):
        return causal_attention_reference(q, k, v, prefix_k, prefix_v, group)
    if prefix_k is not None:
        prefix_k, prefix_v = _same_strides(prefix_k, prefix_v)
    return _PackedCausalAttention.apply(qkv.contiguous(), prefix_k, prefix_v, group)


def causal_attention_reference(q, k, v, prefix_k=None, prefix_v=None, group=None):
    """The PyTorch twin of causal_attention: explicit matmul, mask and softmax in fp32 (fp64 for
    fp64 inputs), cast back; a prefix is gathered in that precision and prepended to k and v."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, _, L, D = q.shape
    k, v = k.to(acc), v.to(acc)                                       # (N, H, L, Dh)
    P = 0
    if prefix_k is not None:
        P = prefix_k.shape[2]
        pk, pv = prefix_k.to(acc), prefix_v.to(acc)                  # (G, H, P, Dh)
        if group is not None:
            pk, pv = pk[group], pv[group]
        pk, pv = pk.expand(N, -1, -1, -1), pv.expand(N, -1, -1, -1)
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)          # (N, H, P + L, Dh)
    s = q.to(acc) @ k.transpose(-2, -1) / math.sqrt(D)              # (N, H, L, P + L)
    seen = torch.ones(L, P + L, dtype=torch.bool, device=q.device).tril(diagonal=P)  # j <= P + i
    return (s.masked_fill(~seen, float("-inf")).softmax(-1) @ v).to(q.dtype)
