"""The text encoder's causal attention, forward + backward: kernels/attention.py against SDPA.

    python3 -m benchmarks.attention            # CUDA, bf16, the train steps' shapes (from the checkout)
    python3 -m benchmarks.attention --smoke    # tiny shapes on whatever device there is (the dry run)

Each row is checked before it is timed: output and gradients of both against the fp32 twin on the
same inputs (relative L2 error; bf16 lands near 1e-3 to 1e-2). The floor is the bytes the
computation cannot avoid at the measured copy bandwidth: q, k, v read and o written forward; q, k,
v, do read and dq, dk, dv written backward (11 tensors of N x H x L x Dh; prefix tensors are small).
"""
import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks.checks import rel_diff
from benchmarks.timing import copy_gbps, time_steps
from coop_min.kernels.attention import causal_attention, causal_attention_reference

H, DH = 8, 64                    # ViT-B/16's text transformer: width 512, 8 heads
# (name, sequences N, own length L, prefix length P, prefix groups G)
SHAPES = [("coop-c1000-L30", 1000, 30, 0, 0), ("cocoop-4000-L18", 4000, 18, 0, 0),
          ("prefix-coop-c1000", 1000, 13, 17, 1), ("prefix-cocoop-b8-c500", 4000, 9, 5, 8)]
SMOKE = [("tiny-L7", 6, 7, 0, 0), ("tiny-prefix", 6, 5, 3, 2)]


def _inputs(n, L, P, G, dtype, device):
    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    qkv = [leaf(n, H, L, DH) for _ in range(3)]
    prefix = [leaf(G, H, P, DH) for _ in range(2)] if P else [None, None]
    group = torch.arange(n, device=device) % G if P and G > 1 else None
    return qkv, prefix, group


def _sdpa(q, k, v, pk, pv, group):
    """What fast.py ran before the kernel: SDPA, the prefix gathered in fp32 and concatenated."""
    if pk is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if group is None:
        pk, pv = pk.expand(len(q), -1, -1, -1), pv.expand(len(q), -1, -1, -1)
    else:
        pk, pv = pk.float()[group].to(q.dtype), pv.float()[group].to(q.dtype)
    P, L = pk.shape[2], q.shape[2]
    mask = torch.ones(L, P + L, dtype=torch.bool, device=q.device).tril(diagonal=P)
    return F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)


def _kernel(q, k, v, pk, pv, group):
    return causal_attention(q, k, v, pk, pv, group) if pk is not None else causal_attention(q, k, v)


def _grads(fn, tensors, grad):
    out = fn(*tensors)
    leaves = [t for t in tensors[:5] if t is not None]
    return [out, *torch.autograd.grad(out, leaves, grad)]


def _time(fn, device, repeats):
    """(median, fastest, slowest) ms of fn() after 3 warm-ups."""
    times = time_steps(fn, device, 3, repeats)
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (the dry run of .ci/gpu)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gbps = copy_gbps(device) if device.type == "cuda" else None
    print(f"{device}, {dtype}, H={H}, Dh={DH}" + (f", copy {gbps:.0f} GB/s" if gbps else ""))
    print(f"{'shape':<24}{'err kernel':>11}{'err sdpa':>10}{'kernel ms (min-max)':>26}{'sdpa ms (min-max)':>26}"
          f"{'speedup':>9}{'floor ms':>10}")
    failed = False
    for name, n, L, P, G in (SMOKE if args.smoke else SHAPES):
        torch.manual_seed(0)
        (q, k, v), (pk, pv), group = _inputs(n, L, P, G, dtype, device)
        tensors = (q, k, v, pk, pv, group)
        grad = torch.randn_like(q)
        exact = [t.detach().float().requires_grad_() if t is not None and t.is_floating_point() else t
                 for t in tensors]
        ref = _grads(causal_attention_reference, exact, grad.float())
        err_k = max(rel_diff(a, b) for a, b in zip(_grads(_kernel, tensors, grad), ref))
        err_s = max(rel_diff(a, b) for a, b in zip(_grads(_sdpa, tensors, grad), ref))
        ok = math.isfinite(err_k) and err_k < (2e-2 if dtype != torch.float32 else 1e-4)
        failed |= not ok
        k_ms = _time(lambda: _grads(_kernel, tensors, grad), device, 5 if args.smoke else 50)
        s_ms = _time(lambda: _grads(_sdpa, tensors, grad), device, 5 if args.smoke else 50)
        floor = 11 * n * H * L * DH * q.element_size() / (gbps * 1e6) if gbps else float("nan")
        spread = lambda t: f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"  # noqa: E731
        print(f"{name:<24}{err_k:>11.1e}{err_s:>10.1e}{spread(k_ms):>26}{spread(s_ms):>26}"
              f"{s_ms[0] / k_ms[0]:>8.2f}x{floor:>10.3f}" + ("" if ok else "  FAIL"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
