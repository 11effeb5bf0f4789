"""Timing and peak memory of one method: a step function built, checked on its first call, timed.

A step is timed after a warm-up as the median of N calls, each bracketed by CUDA events and a
synchronize (the official trainer syncs every step too: loss.item()); the fastest and slowest of the
N calls are reported beside it, as its spread. Peak memory is that method
alone: its CLIP weights plus the most it allocated (torch.cuda.max_memory_allocated, reset per
method), and beside it the most the caching allocator reserved (a CUDA graph's private pool
included). A method that runs out of memory reports OOM instead of ending the run.
"""
import gc
import statistics
import time
import traceback

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup, repeats):
    """Milliseconds of each of `repeats` calls of `step`, after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_ms(step, device, warmup, repeats):
    """Median milliseconds of `step` over `repeats` calls after `warmup` calls."""
    return statistics.median(time_steps(step, device, warmup, repeats))


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def nbytes(module):
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _ctx_grad(step):
    """A train step's (one with a `ctx` attribute) context gradient after its first call, for the check."""
    return {"grad": step.ctx.grad.detach().float().cpu().clone()} if hasattr(step, "ctx") else {}


def run_method(make_step, device, warmup, repeats, weight_bytes=0, to_loss=None, measure=None, check=None):
    """Build one method's state with make_step() -> step, check its first output, time it.

    Returns {"ms" (the median), "ms_min", "ms_max", "peak_gib", "reserved_gib", "loss"} (and "grad"
    for train steps), or {"error": ...}
    ("OOM" when out of memory). The first call is also the first warm-up step; its output (a loss, or
    logits turned into one by to_loss) is the check value. check (benchmarks/checks.py): called as
    check(step, calls made) after the timing and the memory peaks; its result is returned as "check".
    measure (the CPU models): no timing; measure(step) -> (record, output) makes the first call, and
    its record is returned as "record".
    """
    free(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base, base_reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    try:
        step = make_step()
        if measure is not None:
            record, out = measure(step)
            return {"record": record, "loss": float(to_loss(out) if to_loss else out), **_ctx_grad(step)}
        out = step()
        loss, grad = float(to_loss(out) if to_loss else out), _ctx_grad(step)
        del out
        times = time_steps(step, device, max(warmup - 1, 0), repeats)
        result = {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
                  "peak_gib": None, "reserved_gib": None, "loss": loss, **grad}
        if cuda:
            result["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base + weight_bytes) / 2 ** 30
            result["reserved_gib"] = (torch.cuda.max_memory_reserved(device) - base_reserved + weight_bytes) / 2 ** 30
        if check is not None:
            result["check"] = check(step, max(warmup, 1) + repeats)
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as e:  # one broken method must not lose the other cases of a long run
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    return result


def graphed(step):
    """step() captured once as a CUDA graph after a warm-up call on a side stream; returns replay()."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = step()

    def replay():
        graph.replay()
        return out
    return replay


def copy_gbps(device):
    """The device's memory bandwidth ceiling: a large device-to-device copy (read + write), GB/s."""
    n = (256 if device.type == "cuda" else 16) * 2 ** 20
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * n / (time_ms(lambda: y.copy_(x), device, 3, 20) * 1e-3) / 1e9
