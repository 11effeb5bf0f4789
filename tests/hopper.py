"""Compiling recorded Triton launches to sm_90 (H100/H200) cubins on a machine without a GPU.

Triton's interpreter never runs the code a GPU runs (it upcasts 16-bit dots; register limits do not
exist there). The kernel tests therefore record every launch a wrapper issues (Recorder stands in
for the @triton.jit kernel) and compile each as a launch would (compile_for): Triton's own binder
specialises the arguments, as JITFunction.run does on a GPU (an integer equal to 1, such as a unit
stride, becomes a constant; 16-byte aligned pointers and integers divisible by 16 get divisibility
hints that let loads vectorise), and Triton's bundled ptxas compiles the result; its report of
registers, stack frame and spills comes back with the cubin.

What this cannot show: the numerics of the GPU's bf16/fp16 tensor-core dots (the interpreter tests
upcast them; the CUDA tests measure them), faults that only a run can hit (out-of-bounds addresses,
launch limits), and speed. Alignment is the host tensors' here: PyTorch aligns CPU and CUDA
allocations to at least 64 bytes, so views at the same offsets get the same hints.
"""
import contextlib
import io
import re

_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def specialise(target, kernel, args, kwargs):
    """A recorded launch as JITFunction.run specialises it for `target`: (ASTSource, options)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature   # what JITFunction.run binds with

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def compile_for(target, kernel, args, kwargs):
    """Compile one recorded launch for `target` without a GPU, specialised as the launch specialises
    it: (the CompiledKernel, ptxas's -v report)."""
    import triton
    from triton import knobs

    src, options = specialise(target, kernel, args, kwargs)
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(io.StringIO()) as log:
        knobs.compilation.always_compile = True   # a cached kernel would skip ptxas and its report
        knobs.nvidia.dump_ptxas_log = True        # Triton prints ptxas -v's report
        compiled = triton.compile(src, target=target, options=options.__dict__)
    return compiled, log.getvalue()


def spills(report):
    """[(stack frame, spill store, spill load bytes)] of each function in a ptxas -v report."""
    frames = [tuple(int(n) for n in m.groups()) for m in _FRAME.finditer(report)]
    if not frames:
        raise ValueError(f"no 'bytes stack frame' line in the ptxas report:\n{report}")
    return frames
