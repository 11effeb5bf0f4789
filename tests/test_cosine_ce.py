"""The fused cosine cross-entropy kernels against CoOp/CoCoOp's own head, written out here.

The kernel tests run the Triton kernels on CPU under TRITON_INTERPRET=1. Triton reads that variable
when triton.language is first imported, so a plain `pytest` run starts this file once more in a
subprocess with the variable set (test_kernels_under_triton_interpreter) and skips those tests in
the parent; `TRITON_INTERPRET=1 pytest tests/test_cosine_ce.py` runs them directly. The reference
follows the official code: features divided by their norm, logit_scale * f @ t.t() (CoOp) or one
such product per image (CoCoOp), F.cross_entropy; computed in fp64 from the same inputs.

The interpreter never runs the code a GPU runs (it upcasts 16-bit dots; register limits do not
exist there), so test_every_launch_compiles_to_a_hopper_cubin_without_spills records every kernel
launch the wrappers issue and compiles each to an sm_90 cubin with Triton's bundled ptxas, on CPU.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import coop_min.kernels.cosine_ce as cc
from conftest import assert_passes_under_interpreter
from hopper import Recorder as _Recorder, compile_for as _compile_for, specialise, spills

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET subprocess")


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_kernels_under_triton_interpreter():
    assert_passes_under_interpreter(__file__)


def _official_logits(f, t, scale):
    """CoOp CustomCLIP.forward (t (C, D)) / CoCoOp's per-image loop (t (B, C, D)), in fp64."""
    f, t, scale = f.double(), t.double(), scale.double()
    f = f / f.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    if t.dim() == 2:
        return scale * f @ t.t()
    return torch.stack([scale * f_i @ t_i.t() for f_i, t_i in zip(f, t)])


def _inputs(B, C, D, per_image, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    t = torch.randn(*((B,) if per_image else ()), C, D, generator=g)
    t = t.to(device, dtype).requires_grad_()
    scale = torch.tensor(10.0, device=device, requires_grad=True)  # CLIP's 100 saturates tiny cases
    labels = torch.randint(0, C, (B,), generator=g).to(device)
    if B > 2:
        labels[1] = -100  # one ignored row
    return f, t, scale, labels


def _assert_close(actual, expected, tol):
    """Max error relative to the largest reference entry (gradients have entries near zero), and to
    at least 0.1: with one class the exact gradient is 0 (the softmax is 1), while fp32 computes
    p - 1 as rounding noise of ~1e-7, times the logit scale (9e-8 seen with Triton 3.9's interpreter)."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(expected.abs().max().item(), 0.1), f"max error {err:.3g}"


def _check_against_official(B, C, D, per_image, dtype, tol, device="cpu"):
    f, t, scale, labels = _inputs(B, C, D, per_image, dtype, device)
    loss = cc.cosine_ce(f, t, scale, labels)
    grads = torch.autograd.grad(loss, (f, t, scale))
    ref = F.cross_entropy(_official_logits(f, t, scale), labels)
    ref_grads = torch.autograd.grad(ref, (f, t, scale))
    assert loss.dtype == torch.float32 and loss.shape == ()
    _assert_close(loss, ref, tol)
    for x, got, want in zip((f, t, scale), grads, ref_grads):
        assert got.dtype == x.dtype
        _assert_close(got, want, tol)
    with torch.no_grad():
        _assert_close(cc.cosine_logits(f, t, scale), _official_logits(f, t, scale), tol)


@interpreted
def test_interpreter_really_runs_the_kernels():
    assert cc.use_triton(torch.zeros(1))
    assert type(cc._forward_kernel).__name__ == "InterpretedFunction"


@pytest.mark.skipif(INTERPRETED, reason="tests the plain CPU dispatch")
def test_cpu_without_interpreter_uses_the_twin():
    assert not cc.use_triton(torch.zeros(1))


# D=300: the backward kernels write D in chunks of 128 (shared t) or 256 (per image), so these run the
# chunks after the first, as CLIP's D=512/1024 do; (1, 70, 300) per image also splits the classes.
@interpreted
@pytest.mark.parametrize("B,C,D", [(1, 1, 64), (3, 7, 5), (33, 130, 65), (3, 130, 64), (1, 7, 65), (5, 40, 300)])
def test_shared_text_fp32_matches_official(B, C, D):
    _check_against_official(B, C, D, False, torch.float32, 1e-5)


@interpreted
@pytest.mark.parametrize("B,C,D", [(1, 1, 64), (3, 7, 5), (33, 7, 65), (3, 130, 5), (3, 9, 300), (1, 70, 300)])
def test_per_image_text_fp32_matches_official(B, C, D):
    _check_against_official(B, C, D, True, torch.float32, 1e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_image", [False, True])
def test_half_inputs_match_official(dtype, per_image):
    _check_against_official(3, 130 if not per_image else 7, 65, per_image, dtype, 1e-2)


def test_twin_matches_official():
    for per_image in (False, True):
        f, t, scale, labels = _inputs(3, 7, 5, per_image, torch.float32)
        twin = cc.cosine_ce_reference(f, t, scale, labels)
        _assert_close(twin, F.cross_entropy(_official_logits(f, t, scale), labels), 1e-6)


@interpreted
def test_strided_inputs():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(65, 3, generator=g).t().requires_grad_()  # (3, 65), column-major
    t = torch.randn(65, 7, generator=g).t().requires_grad_()  # (7, 65)
    scale, labels = torch.tensor(3.0), torch.tensor([0, 6, 2])
    loss = cc.cosine_ce(f, t, scale, labels)
    ref = F.cross_entropy(_official_logits(f, t, scale), labels)
    _assert_close(loss, ref, 1e-5)
    for got, want in zip(torch.autograd.grad(loss, (f, t)), torch.autograd.grad(ref, (f, t))):
        _assert_close(got, want, 1e-5)


@interpreted
@pytest.mark.parametrize("per_image", [False, True])
def test_only_text_features_trainable(per_image):
    """CoOp: frozen image features and scale; only dt is computed."""
    f, t, scale, labels = _inputs(3, 7, 5, per_image, torch.float32)
    f, scale = f.detach(), scale.detach()
    (dt,) = torch.autograd.grad(cc.cosine_ce(f, t, scale, labels), (t,))
    (ref,) = torch.autograd.grad(F.cross_entropy(_official_logits(f, t, scale), labels), (t,))
    _assert_close(dt, ref, 1e-5)


@interpreted
@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the intended 0/0
@pytest.mark.parametrize("per_image", [False, True])
def test_all_ignored_gives_nan_loss_and_zero_grads_like_pytorch(per_image):
    f, t, scale, labels = _inputs(3, 7, 5, per_image, torch.float32)
    labels = torch.full_like(labels, -1)
    loss = cc.cosine_ce(f, t, scale, labels, ignore_index=-1)
    twin = F.cross_entropy(_official_logits(f, t, scale), labels, ignore_index=-1)
    assert torch.isnan(loss) and torch.isnan(twin)
    for got, want in zip(torch.autograd.grad(loss, (f, t, scale)),
                         torch.autograd.grad(twin, (f, t, scale))):
        assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))


@interpreted
@pytest.mark.parametrize("per_image", [False, True])
def test_gradcheck_fp64(per_image):
    f, t, scale, labels = _inputs(2, 3, 4, per_image, torch.float64)
    scale = scale.detach().double().requires_grad_()
    labels = torch.tensor([2, 0])
    assert torch.autograd.gradcheck(lambda *x: cc.cosine_ce(*x, labels), (f, t, scale))


@interpreted
def test_bad_inputs_raise():
    f, t, scale, labels = _inputs(3, 7, 5, False, torch.float32)
    with pytest.raises(ValueError, match="labels must be in"):
        cc.cosine_ce(f, t, scale, torch.tensor([0, 7, 1]))
    with pytest.raises(TypeError, match="one dtype"):
        cc.cosine_ce(f, t.detach().half(), scale, labels)
    with pytest.raises(ValueError, match="per-image"):
        cc.cosine_ce(f, t.detach().expand(4, 7, 5), scale, labels)
    with pytest.raises(RuntimeError, match="no_grad"):
        cc.cosine_logits(f, t, scale)


@interpreted
def test_label_check_is_the_one_host_read_and_a_caller_that_checked_skips_it(monkeypatch):
    f, t, scale, labels = _inputs(3, 7, 5, False, torch.float32)
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda x: reads.append(1) or item(x))
    loss = cc.cosine_ce(f, t, scale, labels)
    assert len(reads) == 1
    assert torch.equal(cc.cosine_ce(f, t, scale, labels, check_labels=False), loss) and len(reads) == 1
    cc.cosine_ce(f, t, scale, labels, check_labels=False).backward()    # backward takes the extra argument
    cc.cosine_ce(f, t, scale, torch.tensor([0, 7, 1]), check_labels=False)   # unchecked: no error
    with pytest.raises(ValueError, match="labels must be in"):
        cc.cosine_ce(f, t, scale, torch.tensor([0, 7, 1]))


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("per_image", [False, True])
def test_cuda_clip_sizes_match_official(dtype, tol, per_image):
    _check_against_official(32, 1000, 512, per_image, dtype, tol, device="cuda")


# ----------------------------------------------------------------------------- compiles for the GPU

# bench.py's launches (B, C, D, per_image, which gradients): its train steps (only the text features
# train: CoOp at 10-1000 classes and D=512/1024, CoCoOp at batch 1/8 and 50/500 classes) with
# zero-shot logits at batch 256, and its head cases (image and text features); odd sizes besides.
_TRAIN, _HEAD, _ALL = (False, True, False), (True, True, False), (True, True, True)
_STEPS = ([(32, C, D, False, _TRAIN) for C in (10, 100, 1000) for D in (512, 1024)]
          + [(B, C, 512, True, _TRAIN) for B in (1, 8) for C in (50, 500)])
_HEADS = [(32, 1000, 512, False, _HEAD), (8, 500, 512, True, _HEAD), (32, 1000, 512, True, _HEAD)]
_ODD = [(33, 130, 65, False, _ALL), (3, 7, 65, True, _ALL)]


def _record_launches(monkeypatch, shapes, dtype):
    """[(kernel, args, kwargs, shape)] of every launch the wrappers issue for these shapes."""
    launches = []
    for name in ("_forward_kernel", "_finish_kernel", "_backward_rows_kernel", "_backward_cols_kernel", "_logits_kernel"):
        monkeypatch.setattr(cc, name, _Recorder(getattr(cc, name), launches))
    monkeypatch.setattr(cc, "use_triton", lambda x: True)
    monkeypatch.setattr(cc, "_num_sms", lambda device: 132)  # an H100 SXM: the class splits it gets
    shaped = []
    for B, C, D, per_image, needs in shapes:
        f, t, scale, labels = _inputs(B, C, D, per_image, dtype)
        loss, lse, n_kept, _ = cc._forward(f, t, scale, labels, -100)
        cc._backward(torch.ones(()), f, t, scale, labels, lse, n_kept, -100, needs)
        with torch.no_grad():
            cc.cosine_logits(f, t, scale)
            if not per_image:
                cc.cosine_logits(torch.randn(256, D).to(dtype), t, scale)   # zero-shot's batch
        shaped += [(*launch, (B, C, D, per_image, needs)) for launch in launches[len(shaped):]]
    return shaped


@pytest.mark.skipif(INTERPRETED, reason="compiles the GPU code path, not the interpreter's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_launch_compiles_to_a_hopper_cubin_without_spills(monkeypatch, dtype):
    """The interpreter never runs the code the GPU runs (tl.dot on bf16/fp16 tiles, the register
    allocation of each tile shape): build every launch of CoOp and CoCoOp steps, the head and
    inference logits, as the wrappers issue them at bench.py's sizes and odd sizes, into sm_90
    (H100/H200) cubins, specialised as a launch specialises them (tests/hopper.py: unit strides as
    constants, divisibility hints). At the train steps' and zero-shot's sizes ptxas must spill no
    register (stack frame 0); a spill in bench's head cases is reported as an expected failure.
    This cannot show tensor-core numerics, runtime faults or speed (see tests/hopper.py)."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401  (ships ptxas)
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    target, distinct = GPUTarget("cuda", 90, 32), {}       # one compile per distinct specialisation
    for kernel, args, kwargs, shape in _record_launches(monkeypatch, _STEPS + _HEADS + _ODD, dtype):
        src, options = specialise(target, kernel, args, dict(kwargs))
        distinct.setdefault((src.hash(), repr(options)), (kernel, args, kwargs, []))[3].append(shape)
    assert {kernel.fn.__name__ for kernel, *_ in distinct.values()} == {
        "_forward_kernel", "_finish_kernel", "_backward_rows_kernel", "_backward_cols_kernel", "_logits_kernel"}
    head_spills = []
    for kernel, args, kwargs, shapes in distinct.values():
        compiled, report = _compile_for(target, kernel, args, dict(kwargs))
        assert len(compiled.asm["cubin"]) > 1000
        if spills(report) != [(0, 0, 0)]:
            assert not set(shapes) & set(_STEPS), (kernel.fn.__name__, shapes, spills(report), report)
            head_spills += [(kernel.fn.__name__, shape, spills(report)) for shape in set(shapes) & set(_HEADS)]
        shared_t_dots = kernel.fn.__name__ != "_finish_kernel" and not kwargs.get("PER_IMAGE", False)
        if dtype != torch.float32 and shared_t_dots:  # tl.dot on 16-bit tiles
            assert "mma" in compiled.asm["ptx"], f"{kernel.fn.__name__}: 16-bit dots should use tensor cores"
    if head_spills:   # (stack frame, spill store, spill load bytes) of a launch only bench's head cases make
        pytest.xfail(f"registers spill in bench's head cases: {head_spills}")


@pytest.mark.skipif(INTERPRETED, reason="compiles the GPU code path, not the interpreter's")
def test_compiles_specialise_as_a_launch_does(monkeypatch):
    """tests/hopper.py's specialisation is the launch's own: a unit stride becomes a constant, an
    aligned pointer and a multiple of 16 get divisibility hints, other integers none."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    launches = _record_launches(monkeypatch, [(32, 1000, 512, False, _TRAIN)], torch.bfloat16)
    kernel, args, kwargs, _ = next(launch for launch in launches if launch[0].fn.__name__ == "_forward_kernel")
    src, options = specialise(GPUTarget("cuda", 90, 32), kernel, args, dict(kwargs))
    arg = {name: (i,) for i, name in enumerate(kernel.arg_names)}
    assert src.signature["s_fd"] == "constexpr" and src.constants[arg["s_fd"]] == 1        # f.stride(1)
    assert src.attrs[arg["f_ptr"]] == [["tt.divisibility", 16]]
    assert src.attrs[arg["D"]] == [["tt.divisibility", 16]] and src.attrs[arg["C"]] == []  # 512; 1000
    assert options.num_warps == kwargs["num_warps"]
