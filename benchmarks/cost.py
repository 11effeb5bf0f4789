"""--cost: a step's GPU work per path, modelled from its aten ops counted on the CPU; nothing is timed.

One step per path is counted op by op in 2-byte dtypes: FLOPs from torch.utils.flop_counter, bytes as
every non-view aten op's tensor arguments and results (what it reads and writes). Text and ViT depth
are each counted at 1 and 2 layers and every count is extrapolated linearly to the real depths.
"GPU ms" puts matmuls and attention at GPU_TFLOPS (or their traffic, if slower) and all other
traffic at GPU_TBPS, with no launch or host time: roughly what a step replayed from a CUDA graph
approaches. Ours is counted with PyTorch's LayerNorm and QuickGELU, and "fused" is ours with
kernels/elementwise.py's kernels in their place: their ops and bytes replaced by one launch each
way that reads and writes the real inputs and outputs.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.methods import ARCHS, Models, train_methods, zeroshot_methods
from coop_min.clip import LayerNorm, QuickGELU

GPU_TFLOPS, GPU_TBPS = 400, 2.8     # what dense bf16 matmuls and memory traffic reach on an H100 SXM
_MATMULS = ("mm", "addmm", "bmm", "baddbmm", "conv", "_convolution", "linear", "matmul", "_scaled_dot_product",
            "scaled_dot_product", "_native_multi_head_attention")  # name prefixes; inference_mode keeps linear, sdpa whole
_VIEWS = {"view", "_unsafe_view", "expand", "permute", "transpose", "t", "slice", "select", "unsqueeze", "squeeze",
          "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "reshape", "lift_fresh", "empty",
          "empty_like", "new_empty", "new_empty_strided", "empty_strided"}
_FUSABLE_BACKWARDS = ("_LayerNormFP32Backward", "_QuickGELUFnBackward")
_COUNTS = ("ops", "mm_bytes", "other_bytes", "fusable_ops", "fusable_bytes", "fused_ops", "fused_bytes")


class _OpCost(TorchDispatchMode):
    """Counts one call's aten ops that are not views: how many, the bytes of their tensor arguments
    and results, matmuls and attention apart; and separately what our CLIP's LayerNorm and QuickGELU
    modules run, forward (inside the modules) and backward (in their autograd nodes), with what the
    fused kernels would run in their place."""

    def __init__(self):
        super().__init__()
        self.count, self.inside = Counter(), 0

    def enter(self, module, inputs):
        self.inside += 1

    def leave(self, module, inputs, out):
        # the fused kernel: read x, write y, one launch; and if a gradient flows, read x and the
        # gradient, write dx, one launch
        self.inside -= 1
        x = inputs[0]
        self.count["fused_bytes"] += x.nbytes + out.nbytes
        self.count["fused_ops"] += 1
        if torch.is_grad_enabled() and x.requires_grad:
            self.count["fused_bytes"] += 3 * x.nbytes
            self.count["fused_ops"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name.rstrip("_") in _VIEWS:
            return out
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor) and t.numel() > 1]
        n = sum(t.numel() * t.element_size() for t in tensors)
        self.count["ops"] += 1
        self.count["mm_bytes" if name.startswith(_MATMULS) else "other_bytes"] += n
        node = torch._C._current_autograd_node()
        if self.inside or (node is not None and node.name() in _FUSABLE_BACKWARDS):
            self.count["fusable_ops"] += 1
            self.count["fusable_bytes"] += n
        return out


def op_cost(fn, modules=()):
    """({"flops", "ops", "mm_bytes", "other_bytes", "fusable_*", "fused_*"}, fn's output); modules:
    the LayerNorm and QuickGELU modules whose ops count as fusable."""
    flops, counter = FlopCounterMode(display=False), _OpCost()
    hooks = [h for m in modules for h in (m.register_forward_pre_hook(counter.enter),
                                          m.register_forward_hook(counter.leave))]
    try:
        with flops, counter:
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return {"flops": flops.get_total_flops(), **{k: counter.count[k] for k in _COUNTS}}, out


def fusable_modules(clip):
    """The modules whose ops the elementwise kernels replace: every LayerNorm and QuickGELU."""
    return [m for m in clip.modules() if isinstance(m, (LayerNorm, QuickGELU))]


def measure_cost(modules):
    """A `measure` for timing.run_method: op_cost of the step's first call, modules counted apart."""
    def measure(step):
        return op_cost(step, modules)
    return measure


def gpu_ms(flops, mm_bytes, other_bytes):
    """Matmuls at the FLOP rate (or their traffic, if that takes longer), everything else at the bandwidth."""
    return 1e3 * (max(flops / (GPU_TFLOPS * 1e12), mm_bytes / (GPU_TBPS * 1e12)) + other_bytes / (GPU_TBPS * 1e12))


def _extrapolated(base, deeper, layers):
    """Counts at the real depths from those at depth 1 (base) and at each depth raised to 2 (deeper)."""
    return {k: base[k] + sum((n - 1) * (d[k] - base[k]) for n, d in zip(layers, deeper)) for k in base}


def step_costs(case, device, settings):
    """{method: {"record": counts at the real depths, "gpu_ms", "loss", "grad", "dtype"}} for a train
    or zero-shot case, plus "fused" (or {"error"}) and "reference" (the fp32 method's); the first-step
    checks run at depth 1."""
    if settings.fused_elementwise:   # the fused copy of the CLIP would run modules that op_cost does not see
        raise ValueError("the cost model counts ours with PyTorch's LayerNorm and QuickGELU and models the "
                         "kernels in their place; pass Settings(fused_elementwise=False)")
    full = ARCHS[case.arch]
    depths = [(1, 1), (2, 1)] + ([(1, 2)] if full.is_vit else [])
    runs = []
    for text, vision in depths:
        models = Models(case.arch, device, settings, text_layers=text, vision_layers=vision)
        measure = measure_cost(fusable_modules(models.ours))     # the official path runs none of them
        case_methods = zeroshot_methods if case.kind == "zeroshot" else train_methods
        runs.append(case_methods(case, models, device, settings, measure))
    methods = {}
    for name in runs[0]:
        if name == "reference":
            methods[name] = runs[0][name]
            continue
        if any("error" in r[name] for r in runs):
            methods[name] = next(r[name] for r in runs if "error" in r[name])
            continue
        c = _extrapolated(runs[0][name]["record"], [r[name]["record"] for r in runs[1:]],
                          (full.text_layers, full.vision_layers))
        methods[name] = {**runs[0][name], "record": c, "gpu_ms": gpu_ms(c["flops"], c["mm_bytes"], c["other_bytes"])}
        if name == "ours":
            other = c["other_bytes"] - c["fusable_bytes"] + c["fused_bytes"]
            methods["fused"] = {"record": {"ops": c["ops"] - c["fusable_ops"] + c["fused_ops"], "other_bytes": other},
                                "gpu_ms": gpu_ms(c["flops"], c["mm_bytes"], other)}
    return methods

