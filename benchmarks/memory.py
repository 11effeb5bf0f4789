"""--memory: a train case's peak GPU memory per path, modelled on the CPU; nothing is timed.

Both paths run in 2-byte dtypes (bf16 stands in for the official fp16: the same bytes, and fast on
a CPU). The peak of a step's allocations comes from the profiler's allocation events, which count
kernel-internal buffers as CUDA's peak does. Every text layer keeps the same activations for
backward, so the step's own peak is linear in the text depth: it is measured at depths 1 and 2 and
extrapolated to the real one. The frozen image encoder keeps nothing (no grad), so one ViT layer
shows its transient peak, which is the step's peak when it is larger. Plus the real model's weights.
CUDA's workspaces (cuBLAS, cuDNN) are not modelled, so the model reads low where activations are small.
"""
import torch

from benchmarks.methods import ARCHS, Models, train_methods
from benchmarks.official import build_official_clip
from benchmarks.timing import nbytes
from coop_min.clip import CLIP, convert_dtype

IMAGE_RANGE = "bench: image encoder"   # the profiler range that mark_image_encoder opens


def mark_image_encoder(module):
    """Bracket module's forwards with a profiler range, so that cpu_peak_bytes can tell the frozen image
    encoder's transient peak (the same at any depth) from the text side's (linear in the text depth)."""
    ranges = []

    def enter(module, inputs):
        ranges.append(torch.profiler.record_function(IMAGE_RANGE).__enter__())

    def leave(module, inputs, output):
        ranges.pop().__exit__(None, None, None)
    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def cpu_peak_bytes(fn):
    """({"image": most bytes held at once inside the image encoder (see mark_image_encoder), "text":
    most held elsewhere}, fn's output): a running sum over the allocation and free events that the
    profiler records with profile_memory (kineto's events: no public API gives them in order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = prof.profiler.kineto_results.events()
    image = [(e.start_ns(), e.end_ns()) for e in events if e.name() == IMAGE_RANGE]
    held, peak = 0, {"image": 0, "text": 0}
    for t, n in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        held += n
        phase = "image" if any(start <= t <= end for start, end in image) else "text"
        peak[phase] = max(peak[phase], held)
    return peak, out


def _weight_bytes(config, settings):
    """Each path's weight bytes for the full model, allocating nothing."""
    with torch.device("meta"):
        clip = CLIP(config)
        return {"official": nbytes(build_official_clip(clip.state_dict(), config, settings.official_dtype, "meta")),
                "ours": nbytes(convert_dtype(clip, settings.ours_dtype))}


def train_peaks(case, device, settings):
    """{method: {"peak_gib", "loss", "grad", "dtype"} (or {"error"}), "reference": the fp32 method's}
    for a CoOp or CoCoOp case; the first-step checks run at text depth 2."""
    full = ARCHS[case.arch]
    runs = []
    for depth in (1, 2):
        models = Models(case.arch, device, settings, text_layers=depth)
        mark_image_encoder(models.official.visual)
        mark_image_encoder(models.ours.visual)
        runs.append(train_methods(case, models, device, settings, measure=cpu_peak_bytes))
    weights = _weight_bytes(full, settings)
    methods = {}
    for name, one, two in zip(runs[1], runs[0].values(), runs[1].values()):
        if name == "reference":
            methods[name] = two
            continue
        if "error" in one or "error" in two:
            methods[name] = one if "error" in one else two
            continue
        a, b = one["record"]["text"], two["record"]["text"]
        step = max(two["record"]["image"], a + (full.text_layers - 1) * (b - a))
        methods[name] = {"peak_gib": (weights[name] + step) / 2 ** 30,
                         **{k: two[k] for k in ("loss", "grad", "dtype")}}
    return methods
