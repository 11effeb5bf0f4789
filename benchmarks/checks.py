"""After timing, a method that its first call cannot vouch for is checked against its eager twin.

A method's first output is compared with the official path's (bench.summarise), but a graph method's
first calls are eager warm-ups, and a replay that skipped the SGD update or read stale inputs would
still be timed, fast. So the graph and compile columns get a check (timing.run_method's `check`):
after the k timed calls, one more call, and a fresh eager twin (make_reference(), the same optimizer
from the same start) makes k + 1 calls; the two last outputs (the loss, or zero-shot logits) and, for
a train step, the change of its trainable parameters from the start must agree within TOLERANCE for
the method's dtype. A train step for a check has `params` (its trainable parameters) and `start`
(them at build, flattened). A mismatch shows FAIL and no speedup, and bench exits 1.
"""
import torch

# relative difference allowed between a method and its eager twin, which compute the same function
# in the same dtype (the targets: fp32 within 1e-5, bf16 within 1e-2)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def passed(method):
    """False where a method's check (this module's, or bench.summarise's of buckets) failed."""
    return method.get("check", {}).get("ok", True)


def flat(tensors):
    """The tensors as one fp64 vector (a step's `start`)."""
    return torch.cat([t.detach().double().flatten() for t in tensors])


def rel_diff(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def matches_eager(make_reference, dtype):
    """A run_method check: check(step, calls) -> {"output": rel diff, "update": rel diff (train
    steps), "ok": all within TOLERANCE[dtype]}."""
    def check(step, calls):
        out = step()                                      # the last call: its output is read at once
        reference = make_reference()
        for _ in range(calls + 1):
            ref_out = reference()
        diffs = {"output": rel_diff(out, ref_out)}
        if hasattr(step, "params"):                       # the update, not the parameters: they hardly move
            diffs["update"] = rel_diff(flat(step.params) - step.start, flat(reference.params) - reference.start)
        return {**diffs, "ok": max(diffs.values()) <= TOLERANCE[dtype]}
    return check
