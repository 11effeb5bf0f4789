"""The checks of a case's methods: each first output against the fp32 reference, and after timing,
a method that its first call cannot vouch for against its eager twin.

First outputs (vs_reference, from bench.summarise): every method's first loss and, for a train
step, first-step context gradient against the case's reference, the method computed in fp32
(benchmarks/reference.py), within REFERENCE_TOLERANCE for the method's dtype: bf16 rounding in the
frozen CLIP leaves a few percent on the gradient, a wrong EOT row, mask or label far more. The
official path in fp16 is reported, not checked: at ImageNet's class counts its context gradient is
mostly fp16 rounding, a finding about the official recipe rather than a bug of ours. In fp32 (the
CPU) it is the method, and checked as such. The CPU models (--memory, --cost) time nothing and run
bf16 at reduced depth, where tiny models round more than real ones: there every first output is
reported, not checked.

After timing (matches_eager): a graph method's first calls are eager warm-ups, and a replay that
skipped the SGD update or read stale inputs would still be timed, fast. So the graph and compile
columns get a check (timing.run_method's `check`): after the k timed calls, one more call, and a
fresh eager twin (make_twin(), the same optimizer from the same start) makes k + 1 calls; the two
last outputs (the loss, or zero-shot logits) and, for a train step, the change of its trainable
parameters from the start must agree within TOLERANCE for the method's dtype. A train step for a
check has `params` (its trainable parameters) and `start` (them at build, flattened).

Either check failing shows FAIL for the method's time and no speedup, and bench exits 1.
"""
import torch

# relative difference allowed between a method and its eager twin, which compute the same function
# in the same dtype (the targets: fp32 within 1e-5, bf16 within 1e-2)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# relative difference allowed between a method's first loss / context gradient, in its dtype, and the
# fp32 reference's (the official path in fp16 or bf16 is reported, not checked)
REFERENCE_TOLERANCE = {"float32": {"loss": 1e-4, "grad": 1e-4}, "bfloat16": {"loss": 1e-2, "grad": 5e-2}}


def passed(method):
    """False where one of a method's checks failed: against the reference ("vs_fp32", None where only
    reported) or against its eager twin ("check")."""
    return all(method.get(key, {}).get("ok") is not False for key in ("vs_fp32", "check"))


def vs_reference(method, grad, reference, reference_grad, checked=True):
    """A method's first output against the case's reference: {"loss": rel diff, "grad": rel diff
    (train steps), "ok": within REFERENCE_TOLERANCE of its "dtype", or None where not checked}.
    Without a reference (it failed) a checked method fails: nothing vouches for it."""
    if "loss" not in reference:
        return {"ok": False if checked else None, "error": "no fp32 reference"}
    ref = reference["loss"]
    d = {"loss": abs(method["loss"] - ref) / max(abs(ref), 1e-12)}
    if grad is not None and reference_grad is not None:
        d["grad"] = rel_diff(grad, reference_grad)
    tolerance = REFERENCE_TOLERANCE[method["dtype"]] if checked else None
    d["ok"] = None if tolerance is None else all(d[k] <= tolerance[k] for k in ("loss", "grad") if k in d)
    return d


def flat(tensors):
    """The tensors as one fp64 vector (a step's `start`)."""
    return torch.cat([t.detach().double().flatten() for t in tensors])


def rel_diff(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def matches_eager(make_twin, dtype):
    """A run_method check: check(step, calls) -> {"output": rel diff, "update": rel diff (train
    steps), "ok": all within TOLERANCE[dtype]}."""
    def check(step, calls):
        out = step()                                      # the last call: its output is read at once
        twin = make_twin()
        for _ in range(calls + 1):
            twin_out = twin()
        diffs = {"output": rel_diff(out, twin_out)}
        if hasattr(step, "params"):                       # the update, not the parameters: they hardly move
            diffs["update"] = rel_diff(flat(step.params) - step.start, flat(twin.params) - twin.start)
        return {**diffs, "ok": max(diffs.values()) <= TOLERANCE[dtype]}
    return check
