"""The fused LayerNorm and QuickGELU kernels against float64 maths, and the fast path that uses them.

As in test_cosine_ce.py, the kernel tests run the Triton kernels on CPU under TRITON_INTERPRET=1: a
plain `pytest` run starts this file once more in a subprocess with the variable set and skips those
tests in the parent. The references are OpenAI's definitions computed in float64 from the same
16-bit inputs: LayerNorm over the last dimension, x * sigmoid(1.702 x). The kernels compute in fp32
and round once, so they must be within a rounding or two of those. The PyTorch twins (OpenAI's code)
round after every op in 16 bits and get twice that bound, which they need: it is not loose.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import coop_min.kernels.elementwise as ew
from conftest import assert_passes_under_interpreter
from hopper import Recorder, compile_for, spills

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET subprocess")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# |kernel - float64| allowed, relative to the largest |reference| value: fp32 a few units in the last
# place of a sum over W; 16-bit two units of the format at the scale of the data
_TOL = {torch.float32: 2e-6, torch.bfloat16: 2 * 2 ** -8, torch.float16: 2 * 2 ** -11}


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_kernels_under_triton_interpreter():
    assert_passes_under_interpreter(__file__)


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = shape[-1]
    x = (2 * torch.randn(*shape, generator=g) + 0.5).to(dtype)
    weight, bias = 1 + 0.3 * torch.randn(W, generator=g), 0.2 * torch.randn(W, generator=g)   # fp32, as CLIP keeps them
    grad = torch.randn(*shape, generator=g).to(dtype)
    return x, weight, bias, grad


def _close(actual, expected, dtype, what, units=1):
    err = float((actual.detach().double() - expected).abs().max() / expected.abs().max())
    assert err <= units * _TOL[dtype], f"{what}: {err:.3g} > {units * _TOL[dtype]:.3g}"


def _exact(fn, x, grad, *params):
    """fn in float64 on x's values, and its gradient for `grad`."""
    x64 = x.double().requires_grad_()
    y = fn(x64, *[None if p is None else p.double() for p in params])
    y.backward(grad.double())
    return y.detach(), x64.grad


def _ln64(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, 1e-5)


def _gelu64(x):
    return x * torch.sigmoid(1.702 * x)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 64), (5, 65), (2, 300), (3, 1024)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_float64_and_so_does_the_twin(dtype, shape, affine):
    x0, weight, bias, grad = _inputs(shape, dtype)
    weight, bias = (weight, bias) if affine else (None, None)
    y_ref, dx_ref = _exact(_ln64, x0, grad, weight, bias)
    for name, fn, units in (("kernel", ew.layer_norm, 1), ("twin", ew.layer_norm_reference, 2)):
        x = x0.clone().requires_grad_()
        y = fn(x, weight, bias)
        y.backward(grad)
        assert y.dtype == x.dtype and y.shape == x.shape
        _close(y, y_ref, dtype, f"{name} forward", units)
        _close(x.grad, dx_ref, dtype, f"{name} backward", units)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 256), (1000,), (2, 1025)])   # one block, several, a ragged one
def test_quick_gelu_matches_float64_and_so_does_the_twin(dtype, shape):
    x0, _, _, grad = _inputs(shape, dtype)
    y_ref, dx_ref = _exact(_gelu64, x0, grad)
    for name, fn, units in (("kernel", ew.quick_gelu, 1), ("twin", ew.quick_gelu_reference, 2)):
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(grad)
        _close(y, y_ref, dtype, f"{name} forward", units)
        _close(x.grad, dx_ref, dtype, f"{name} backward", units)


@interpreted
def test_non_contiguous_inputs_and_gradients():
    x0, weight, bias, grad = _inputs((6, 5, 64), torch.bfloat16)
    x = x0.transpose(0, 1).requires_grad_()                 # (5, 6, 64), not contiguous
    y_ref, dx_ref = _exact(_ln64, x.detach(), grad.transpose(0, 1), weight, bias)
    ew.layer_norm(x, weight, bias).backward(grad.transpose(0, 1))
    _close(x.grad, dx_ref, torch.bfloat16, "layer_norm backward")
    x = x0.transpose(0, 1).requires_grad_()
    y_ref, dx_ref = _exact(_gelu64, x.detach(), grad.transpose(0, 1))
    y = ew.quick_gelu(x)
    y.backward(grad.transpose(0, 1))
    _close(y, y_ref, torch.bfloat16, "quick_gelu forward")
    _close(x.grad, dx_ref, torch.bfloat16, "quick_gelu backward")


@interpreted
def test_backward_keeps_the_16_bit_input_and_fp32_row_statistics_only():
    x, weight, bias, _ = _inputs((4, 9, 64), torch.bfloat16)
    kept = []
    x.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        ew.layer_norm(x, weight, bias)
        ew.quick_gelu(x)
    assert sorted(kept, key=str) == sorted([(torch.bfloat16, (36, 64)), (torch.float32, (64,)), (torch.float32, (36,)),
                                            (torch.float32, (36,)), (torch.bfloat16, (4, 9, 64))], key=str)


@interpreted
def test_a_trainable_weight_runs_the_twin_and_gets_its_gradient():
    x, weight, bias, grad = _inputs((4, 64), torch.float32)
    weight.requires_grad_()
    ew.layer_norm(x, weight, bias).backward(grad)
    expected = (grad * F.layer_norm(x, (64,), eps=1e-5)).sum(0)
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-5)


def test_on_cpu_without_the_interpreter_they_are_the_twins():
    if INTERPRETED:
        pytest.skip("the interpreter runs the kernels on CPU")
    x, weight, bias, _ = _inputs((3, 64), torch.bfloat16)
    assert torch.equal(ew.layer_norm(x, weight, bias), ew.layer_norm_reference(x, weight, bias))
    assert torch.equal(ew.quick_gelu(x), ew.quick_gelu_reference(x))


def test_a_weight_of_the_wrong_width_is_refused():
    x, weight, bias, _ = _inputs((3, 64), torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(64,\)"):
        ew.layer_norm(x, weight[:32], bias)


@interpreted
@pytest.mark.parametrize("method,shared_prefix,resnet", [("coop", False, False), ("coop", True, False),
                                                         ("cocoop", False, False), ("cocoop", True, False),
                                                         ("coop", False, True)])
def test_fast_path_with_the_kernels_equals_the_reference_path(monkeypatch, method, shared_prefix, resnet):
    """Under the interpreter PromptedCLIP's fast path runs the CLIP's LayerNorms and QuickGELUs as
    these kernels, and the text's attention as kernels/attention.py (counted): loss and context
    gradient must equal the plain reference path's (fp32)."""
    from coop_min import fast
    from coop_min.clip import CLIP, CLIPConfig
    from coop_min.fast import FastConfig, FastPromptedCLIP
    from coop_min.prompts import PromptConfig, build_prompted_clip

    calls = {"layer_norm": 0, "quick_gelu": 0, "causal_attention_packed": 0}
    for module, name in ((ew, "layer_norm"), (ew, "quick_gelu"), (fast, "causal_attention_packed")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or _k(*a, **k))
    torch.manual_seed(0)
    vision = ((1, 1, 1, 1), 8, None) if resnet else (2, 64, 16)             # layers, width, patch
    clip = CLIP(CLIPConfig(32, 32, *vision, 2, 77, 49408, 64, 2, 2)).eval()
    names = ["cat", "sea lion", "fire truck", "a"]
    config = PromptConfig.for_method(method, ctx_init="")
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 3, 1])
    results = []
    for reference in (False, True):
        model = build_prompted_clip(clip, names, config, seed=2)
        if not reference:
            model = FastPromptedCLIP(clip, model.learner, FastConfig(shared_prefix=shared_prefix))
        loss = model.loss(images, labels)
        loss.backward()
        results.append((loss.detach(), model.learner.ctx.grad.clone()))
        if not reference:
            # ViT: ln_pre, ln_post, 2 per block (a ResNet has none); text: 2 per block and ln_final
            image = (0, 0) if resnet else (2 + 2 * 2, 2)
            assert calls["layer_norm"] >= image[0] + 2 * 2 + 1 and calls["quick_gelu"] >= image[1] + 2, calls
            assert calls["causal_attention_packed"] >= 2, calls   # each text layer (and its prefix)
            seen = dict(calls)
    assert calls == seen                                   # the reference path calls none of them
    (fast_loss, fast_grad), (ref_loss, ref_grad) = results
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    assert (fast_grad - ref_grad).norm() <= 1e-5 * ref_grad.norm()        # the fp32 contract


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("W", [512, 768, 1024])
def test_cuda_kernels_at_clip_widths_match_float64(dtype, W):
    x0, weight, bias, grad = (t.cuda() for t in _inputs((25000, W), dtype))
    assert ew.layer_norm(x0, weight, bias).is_cuda and ew.use_triton(x0)
    for fn, ref, params in ((ew.layer_norm, _ln64, (weight, bias)), (ew.quick_gelu, _gelu64, ())):
        y_ref, dx_ref = _exact(ref, x0, grad, *params)
        x = x0.clone().requires_grad_()
        y = fn(x, *params)
        y.backward(grad)
        _close(y, y_ref, dtype, f"{fn.__name__} forward")
        _close(x.grad, dx_ref, dtype, f"{fn.__name__} backward")


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_cuda_bf16_fast_path_with_the_kernels_is_close_to_without(method):
    """ViT-B/16 text and image shapes in bf16 on the GPU: the fused kernels change roundings only."""
    from coop_min.clip import CLIP, CLIPConfig, convert_dtype
    from coop_min.fast import FastConfig, FastPromptedCLIP
    from coop_min.prompts import PromptConfig, build_prompted_clip

    torch.manual_seed(0)
    clip = convert_dtype(CLIP(CLIPConfig(512, 224, 12, 768, 16, 12, 77, 49408, 512, 8, 12)).eval().cuda(), torch.bfloat16)
    names = [f"class {i}" for i in range(100)]
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 224, 224, generator=g).cuda(), torch.tensor([0, 3, 1, 99]).cuda()
    out = []
    for fused in (True, False):
        learner = build_prompted_clip(clip, names, PromptConfig.for_method(method), seed=2).learner
        model = FastPromptedCLIP(clip, learner, FastConfig(fused_elementwise=fused))
        loss = model.loss(images, labels)
        loss.backward()
        out.append((float(loss), model.learner.ctx.grad.float().clone()))
    (loss_a, grad_a), (loss_b, grad_b) = out
    assert abs(loss_a - loss_b) <= 1e-2 * abs(loss_b)
    assert (grad_a - grad_b).norm() <= 5e-2 * grad_b.norm()


@pytest.mark.skipif(INTERPRETED, reason="compiles the GPU code path, not the interpreter's")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_launch_compiles_to_a_hopper_cubin_without_spills(monkeypatch, dtype):
    """Every launch the wrappers issue at CLIP widths (512, 768, 1024, and an odd 65), with and without
    LayerNorm weights, compiles to an sm_90 (H100/H200) cubin, specialised as a launch specialises it
    (tests/hopper.py), and ptxas spills no register (stack frame 0). This cannot show the GPU's
    numerics, runtime faults or speed (see tests/hopper.py)."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401  (ships ptxas)
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    launches = []
    kernels = ("_layer_norm_forward_kernel", "_layer_norm_backward_kernel", "_quick_gelu_forward_kernel",
               "_quick_gelu_backward_kernel")
    for name in kernels:
        monkeypatch.setattr(ew, name, Recorder(getattr(ew, name), launches))
    for W in (512, 768, 1024, 65):
        x, weight, bias, grad = _inputs((3, W), dtype)
        for w, b in ((weight, bias), (None, None)):
            y, mean, rstd = ew._layer_norm_forward(x, w, b, 1e-5)
            ew._layer_norm_backward(grad, x, w, mean, rstd)
        ew._quick_gelu_forward(x)
        ew._quick_gelu_backward(grad, x)
    assert {k.fn.__name__ for k, _, _ in launches} == set(kernels)
    for kernel, args, kwargs in launches:
        compiled, report = compile_for(GPUTarget("cuda", 90, 32), kernel, args, dict(kwargs))
        assert len(compiled.asm["cubin"]) > 1000
        assert spills(report) == [(0, 0, 0)], (kernel.fn.__name__, report)
