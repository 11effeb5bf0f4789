"""Compiling recorded Triton launches to sm_90 (H100/H200) cubins on a machine without a GPU.

Triton's interpreter never runs the code a GPU runs (it upcasts 16-bit dots; register limits do not
exist there). The kernel tests therefore record every launch a wrapper issues (Recorder stands in
for the @triton.jit kernel) and compile each with Triton's bundled ptxas (compile_for).
"""
import torch

_SIG = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32"}


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def compile_for(target, kernel, args, kwargs):
    """Compile one recorded launch to a cubin for `target` without a GPU (Triton's ptxas)."""
    import triton
    from triton.compiler import ASTSource
    options = {"num_warps": kwargs.pop("num_warps", 4)}
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    signature, constexprs = {}, {}
    for name, param in zip(kernel.arg_names, kernel.params):
        value = named[name]
        if param.is_constexpr or value is None:           # a None pointer is specialised away, as at launch
            signature[name], constexprs[name] = "constexpr", value
        elif torch.is_tensor(value):
            signature[name] = _SIG[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            assert isinstance(value, int) and not isinstance(value, bool), (name, value)
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    return triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
