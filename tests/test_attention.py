"""The short-sequence causal attention kernels against PyTorch's SDPA in float64, and their twin.

As in test_cosine_ce.py, the kernel tests run the Triton kernels on CPU under TRITON_INTERPRET=1: a
plain `pytest` run starts this file once more in a subprocess with the variable set and skips those
tests in the parent. The independent reference is F.scaled_dot_product_attention in float64 on the
same inputs: is_causal=True, or, with a prefix, the prefix keys and values prepended and the mask
that coop_min/fast.py builds. Each comparison also checks that a mask off by one key would fail it.

The interpreter never runs the code a GPU runs, so test_every_launch_compiles_to_a_hopper_cubin_
without_spills records the wrappers' launches at the train steps' shapes and compiles each to an
sm_90 cubin with Triton's bundled ptxas, on CPU (tests/hopper.py).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import coop_min.kernels.attention as at
from conftest import assert_passes_under_interpreter
from hopper import Recorder, compile_for, specialise, spills

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET subprocess")
# max error relative to the largest reference entry: fp32 a few roundings of sums over L and Dh;
# 16-bit inputs go through 16-bit tiles (p, ds) on the way, as flash attention's do
_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_kernels_under_triton_interpreter():
    assert_passes_under_interpreter(__file__)


def _tensors(*shapes, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(device, dtype) for shape in shapes]


def _sdpa64(q, k, v, grad, prefix_k=None, prefix_v=None, group=None, shift=0):
    """SDPA in float64 on the same values: (output, gradients of q, k, v[, prefix_k, prefix_v]).
    shift=1 lets every query see one key too many (a wrong mask)."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, prefix_k, prefix_v) if x is not None]
    q, k, v = leaves[:3]
    L = q.shape[2]
    if prefix_k is None:
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(diagonal=shift)
    else:   # as coop_min/fast.py: the prefix gathered per row and prepended, row j sees <= P + j
        pk, pv = leaves[3:]
        pk, pv = (pk.expand(len(q), -1, -1, -1), pv.expand(len(q), -1, -1, -1)) if group is None \
            else (pk[group], pv[group])
        P = pk.shape[2]
        k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        mask = torch.ones(L, P + L, dtype=torch.bool, device=q.device).tril(diagonal=P + shift)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.detach(), torch.autograd.grad(y, leaves, grad.double())


def _run(fn, grad, *inputs, group=None):
    """fn's output and the gradients of its (tensor) inputs for the incoming gradient grad."""
    leaves = [x.clone().requires_grad_() if x is not None else None for x in inputs]
    y = fn(*leaves, group=group) if len(leaves) > 3 else fn(*leaves)
    return y, torch.autograd.grad(y, [x for x in leaves if x is not None], grad)


def _err(actual, expected):
    """Max error relative to the largest reference entry (at least 1e-6: one token's dq is 0)."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-6)).item()


def _check(inputs, grad, dtype, group=None):
    """Kernel and twin against float64 SDPA within _TOL; the off-by-one mask outside it."""
    y_ref, grads_ref = _sdpa64(*inputs[:3], grad, *inputs[3:], group=group)
    y_wrong, _ = _sdpa64(*inputs[:3], grad, *inputs[3:], group=group, shift=1)
    for name, fn in (("kernel", at.causal_attention), ("twin", at.causal_attention_reference)):
        y, grads = _run(fn, grad, *inputs, group=group)
        assert y.dtype == dtype and y.shape == inputs[0].shape, name
        for what, got, want in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), (y, *grads), (y_ref, *grads_ref)):
            assert got.dtype == dtype, (name, what)
            assert _err(got, want) <= _TOL[dtype], (name, what, _err(got, want))
        assert _err(y, y_wrong) > 10 * _TOL[dtype], name      # these tolerances see a wrong mask


@interpreted
def test_interpreter_really_runs_the_kernels():
    assert at.use_triton(torch.zeros(1))
    assert type(at._forward_kernel).__name__ == "InterpretedFunction"


@pytest.mark.skipif(INTERPRETED, reason="tests the plain CPU dispatch")
def test_cpu_without_interpreter_uses_the_twin():
    q, k, v = _tensors(*[(2, 3, 7, 64)] * 3, dtype=torch.float32)
    assert torch.equal(at.causal_attention(q, k, v), at.causal_attention_reference(q, k, v))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [2, 3, 7, 16, 18, 30, 31, 77])
def test_kernel_and_twin_match_sdpa(L, dtype):
    *qkv, grad = _tensors(*[(2, 2, L, 64)] * 4, dtype=dtype, seed=L)
    _check(qkv, grad, dtype)


@interpreted
@pytest.mark.parametrize("L,D,dtype", [(1, 64, torch.float32), (5, 16, torch.float32),
                                       (9, 40, torch.float32), (30, 64, torch.float16)])
def test_one_token_small_and_odd_head_dims_and_fp16(L, D, dtype):
    *qkv, grad = _tensors(*[(3, 2, L, D)] * 4, dtype=dtype)
    y_ref, grads_ref = _sdpa64(*qkv, grad)
    y, grads = _run(at.causal_attention, grad, *qkv)
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        assert _err(got, want) <= _TOL[dtype]


# (P, L, G): CoOp's [SOS, 16 ctx] prefix shared by all rows (G=1, no group), CoCoOp's [SOS, 4 ctx]
# one per image (group), a one-token prefix, and a full 77-token context
@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P,L,G", [(17, 13, None), (5, 8, 3), (1, 2, None), (17, 60, 2)])
def test_prefix_kernel_and_twin_match_sdpa_on_prepended_keys(P, L, G, dtype):
    N, H = 4, 2
    q, k, v, grad = _tensors(*[(N, H, L, 64)] * 4, dtype=dtype, seed=P)
    pk, pv = _tensors(*[(G or 1, H, P, 64)] * 2, dtype=dtype, seed=L)
    group = None if G is None else torch.tensor([G - 1, 0, G - 1, G - 1])   # G=3: prefix 1 unused
    _check([q, k, v, pk, pv], grad, dtype, group)


@interpreted
def test_a_frozen_prefix_gets_no_gradient_and_the_rest_is_unchanged():
    q, k, v, grad = _tensors(*[(3, 2, 6, 64)] * 4, dtype=torch.float32)
    pk, pv = _tensors(*[(1, 2, 5, 64)] * 2, dtype=torch.float32, seed=1)
    q = q.requires_grad_()
    y = at.causal_attention(q, k, v, pk, pv)
    (dq,) = torch.autograd.grad(y, (q,), grad)
    y_ref, grads_ref = _sdpa64(q, k, v, grad, pk, pv)
    assert _err(y, y_ref) <= 1e-5 and _err(dq, grads_ref[0]) <= 1e-5


@interpreted
def test_packed_qkv_views_need_no_copy_and_the_output_transposes_for_free():
    """As clip.py calls it: q, k, v are views of one (N, L, 3W) projection, and the output goes back
    to (N, L, W) with y.transpose(1, 2).reshape(...)."""
    N, L, H, D = 3, 11, 2, 64
    x, grad = _tensors((N, L, 3 * H * D), (N, L, H * D), dtype=torch.float32)
    outs = []
    for attention in (at.causal_attention, F.scaled_dot_product_attention):
        x64 = x.double() if attention is F.scaled_dot_product_attention else x
        x64 = x64.clone().requires_grad_()
        q, k, v = x64.view(N, L, 3, H, D).permute(2, 0, 3, 1, 4)           # (N, H, L, Dh) each
        if attention is at.causal_attention:
            assert all(a is b for a, b in zip(at._same_strides(q, k, v), (q, k, v)))
            y = attention(q, k, v)
            assert y.transpose(1, 2).is_contiguous()
        else:
            y = attention(q, k, v, is_causal=True)
        out = y.transpose(1, 2).reshape(N, L, H * D)
        out.backward(grad.to(out.dtype))
        outs.append((out.detach(), x64.grad))
    (out, dx), (out_ref, dx_ref) = outs
    assert _err(out, out_ref) <= 1e-5 and _err(dx, dx_ref) <= 1e-5


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P,G", [(0, None), (5, 3)])
def test_packed_qkv_gradient_is_written_in_place_of_a_stack_and_copy(P, G, dtype):
    """causal_attention_packed on x (N, L, 3W) viewed as (N, L, 3, H, Dh), as fast.py calls it: the
    output and every gradient equal float64 SDPA on the unpacked views, and its backward runs no
    stack or clone (three views' gradients would be stacked, then copied into x's layout)."""
    N, L, H, D = 4, 13, 2, 64
    x, grad, pk, pv = _tensors((N, L, 3 * H * D), (N, H, L, D), (G or 1, H, P, D), (G or 1, H, P, D),
                               dtype=dtype, seed=P)
    group = None if G is None else torch.tensor([2, 0, 1, 2])
    x, pk, pv = (t.clone().requires_grad_() for t in (x, pk, pv))
    q, k, v = x.view(N, L, 3, H, D).permute(2, 0, 3, 1, 4)
    y_ref, (dq, dk, dv, *dprefix) = _sdpa64(q, k, v, grad, *((pk, pv) if P else ()), group=group)
    y = at.causal_attention_packed(x.view(N, L, 3, H, D), *((pk, pv) if P else ()), group=group)
    with _Ops() as ops:
        y.backward(grad)
    assert "stack" not in ops.names and "clone" not in ops.names, ops.names
    dx_ref = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(N, L, 3 * H * D)
    for what, got, want in [("out", y, y_ref), ("dx", x.grad, dx_ref)] + (
            [("dpk", pk.grad, dprefix[0]), ("dpv", pv.grad, dprefix[1])] if P else []):
        assert got.dtype == dtype and got.shape == want.shape, what
        assert _err(got, want) <= _TOL[dtype], (what, _err(got, want))
    with pytest.raises(ValueError, match=r"\(N, L, 3, H, Dh\)"):
        at.causal_attention_packed(x.view(N, L, 3 * H, D))


@interpreted
def test_shapes_and_dtypes_outside_the_kernels_run_the_twin(monkeypatch):
    monkeypatch.setattr(at._CausalAttention, "apply", None)          # any kernel call would fail
    for shape, dtype in (((1, 1, 5, 64), torch.float64), ((1, 1, 129, 16), torch.float32),
                         ((1, 1, 5, 256), torch.float32)):
        q, k, v = _tensors(shape, shape, shape, dtype=dtype)
        assert torch.equal(at.causal_attention(q, k, v), at.causal_attention_reference(q, k, v))


def test_bad_inputs_raise():
    q, k, v = _tensors(*[(4, 2, 5, 64)] * 3, dtype=torch.float32)
    pk, = _tensors((2, 2, 3, 64), dtype=torch.float32)
    with pytest.raises(ValueError, match="one shape"):
        at.causal_attention(q, k[:, :, :4], v)
    with pytest.raises(TypeError, match="one dtype"):
        at.causal_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="together"):
        at.causal_attention(q, k, v, pk)
    with pytest.raises(ValueError, match=r"\(G, 2, P, 64\)"):
        at.causal_attention(q, k, v, pk[..., :32], pk[..., :32])
    with pytest.raises(ValueError, match="need group"):
        at.causal_attention(q, k, v, pk, pk)
    with pytest.raises(ValueError, match="group must be a long"):
        at.causal_attention(q, k, v, pk, pk, torch.zeros(4, dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("N,L,P,G", [(1000, 30, 0, None), (4000, 18, 0, None), (1000, 13, 17, None),
                                     (400, 14, 5, 4)])
def test_cuda_train_shapes_match_sdpa(N, L, P, G):
    dtype, H = torch.bfloat16, 8
    q, k, v, grad = _tensors(*[(N, H, L, 64)] * 4, dtype=dtype, device="cuda")
    prefix = _tensors(*[(G or 1, H, P, 64)] * 2, dtype=dtype, device="cuda", seed=1) if P else []
    group = None if G is None else torch.arange(N, device="cuda") % G
    y_ref, grads_ref = _sdpa64(q, k, v, grad, *prefix, group=group)
    y, grads = _run(at.causal_attention, grad, q, k, v, *prefix, group=group)
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        assert _err(got, want) <= _TOL[dtype]


# ----------------------------------------------------------------------------- compiles for the GPU

# (N, L, P, G, dtype): the text encoder's train steps (EOT-truncated CoOp prompts, 8 heads of 64),
# the shared-prefix forms (CoOp's 17-token prefix for every class, CoCoOp's 5-token one per image)
# and the full 77-token context
_STEPS = [(1000, 30, 0, None, torch.bfloat16), (4000, 18, 0, None, torch.bfloat16)]
_OTHERS = [(1000, 13, 17, None, torch.bfloat16), (400, 14, 5, 4, torch.bfloat16),
           (8, 77, 0, None, torch.bfloat16), (1000, 30, 0, None, torch.float32),
           (1000, 30, 0, None, torch.float16)]


def _packed(N, L, dtype, H=8, D=64):
    """q, k, v as clip.py passes them: views (N, H, L, Dh) of one (N, L, 3W) projection."""
    return torch.empty(N, L, 3 * H * D, dtype=dtype).view(N, L, 3, H, D).permute(2, 0, 3, 1, 4)


@pytest.mark.skipif(INTERPRETED, reason="compiles the GPU code path, not the interpreter's")
def test_every_launch_compiles_to_a_hopper_cubin_without_spills(monkeypatch):
    """Both kernels as the wrappers launch them at the train steps' shapes (and the prefix forms,
    L=77, fp32 and fp16) build into sm_90 (H100/H200) cubins, specialised as a launch specialises
    them (tests/hopper.py); ptxas spills no register and 16-bit tiles use tensor cores (mma). This
    cannot show the GPU's numerics, runtime faults or speed."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401  (ships ptxas)
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    launches, compiled_keys = [], set()
    for name in ("_forward_kernel", "_backward_kernel"):
        monkeypatch.setattr(at, name, Recorder(getattr(at, name), launches))
    target = GPUTarget("cuda", 90, 32)
    for N, L, P, G, dtype in _STEPS + _OTHERS:
        q, k, v = _packed(N, L, dtype)
        pk, pv = _packed(G or 1, P, dtype)[1:] if P else (None, None)
        group = None if G is None else torch.zeros(N, dtype=torch.long)
        grad = torch.empty(N, L, 8, 64, dtype=dtype).transpose(1, 2)   # as y.transpose(1, 2) gets it
        at._forward(q, k, v, pk, pv, group)
        dqkv = torch.empty(N, L, 3, 8, 64, dtype=dtype)                 # the packed gradient fast.py asks for
        at._backward(grad, q, k, v, pk, pv, group, write_prefix=P > 0, dqkv=dqkv)
        assert [kernel.fn.__name__ for kernel, _, _ in launches] == ["_forward_kernel", "_backward_kernel"]
        for kernel, args, kwargs in launches:          # one compile per distinct specialisation
            src, options = specialise(target, kernel, args, dict(kwargs))
            if (src.hash(), repr(options)) in compiled_keys:
                continue
            compiled_keys.add((src.hash(), repr(options)))
            compiled, report = compile_for(target, kernel, args, dict(kwargs))
            assert len(compiled.asm["cubin"]) > 1000
            assert spills(report) == [(0, 0, 0)], (kernel.fn.__name__, (N, L, P, dtype), report)
            if dtype != torch.float32:
                assert "mma" in compiled.asm["ptx"], (kernel.fn.__name__, (N, L, P, dtype))
        launches.clear()                                # frees the shape's tensors
