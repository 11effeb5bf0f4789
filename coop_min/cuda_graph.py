"""One SGD training step, run eagerly or captured once as a CUDA graph and replayed.

Why: at CoOp's sizes a step is bound by kernel launches and Python, not by arithmetic (the GPU idles
for most of an eager step; docs/performance.md). A CUDA graph records the step's few hundred
kernels once -- forward, backward and the optimizer update -- and replays them with one launch, so
the step costs about what the GPU computes.

What capture needs, and how the fast path gives it:
- static shapes: a fixed batch (training batches drop the last partial one) and class list; inputs
  are copied into static buffers, and a batch of another shape runs eagerly instead;
- no host reads of device values inside the step: EOT lengths are known on the host
  (the learner's `eot_list`, used by fast.py), the head skips its label check while capturing (checked on the host
  instead), the loss share of a data-parallel part is an input tensor;
- fixed learning rates: the captured SGD update holds them as constants, so when a param group's lr
  changes (Dassl's schedule: once per epoch) the step is captured again;
- no CUDA calls from other threads counted against the capture: a DataLoader's pin-memory thread
  allocates pinned host memory whenever it prefetches, which the default "global" capture mode treats
  as an error (the capture fails, and the loader thread dies with it), so capture is "thread_local".
The first `warmup` calls are ordinary eager steps on a side stream (they are real training steps;
they also create the momentum buffers and let cuBLAS and Triton choose and compile their kernels).
A replay runs the same kernels as an eager step, so the numbers are the same.
"""
import torch


class TrainStep:
    """step(*inputs) -> forward's outputs, detached, after loss.backward(), after_backward() and
    optimizer.step(). forward(*inputs) returns (loss, *extras). cuda_graph=True captures it.

    With a CUDA graph the returned tensors are static: read them before the next call."""

    def __init__(self, forward, optimizer, cuda_graph=False, after_backward=None, warmup=2):
        self.forward, self.optimizer, self.after_backward = forward, optimizer, after_backward
        self.cuda_graph, self.warmup = cuda_graph, warmup
        self.graph = self.static_inputs = self.static_outputs = self.lrs = None

    def _eager(self, inputs):
        outputs = self.forward(*inputs)
        self.optimizer.zero_grad(set_to_none=True)
        outputs[0].backward()
        if self.after_backward is not None:
            self.after_backward()
        self.optimizer.step()
        return tuple(x.detach() for x in outputs)

    def __call__(self, *inputs):
        if not self.cuda_graph:
            return self._eager(inputs)
        if self.warmup > 0:                                 # side stream, as torch.cuda.graphs advises
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self._eager(inputs)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.static_inputs is not None and any(x.shape != s.shape or x.dtype != s.dtype
                                                  for x, s in zip(inputs, self.static_inputs)):
            return self._eager(inputs)                      # e.g. a batch that lost a skipped image
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self.graph is None or lrs != self.lrs:
            self._capture(inputs, lrs)
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_outputs

    def _capture(self, inputs, lrs):
        self.graph = self.static_outputs = None              # free the previous graph's memory first
        self.static_inputs = [x.clone() for x in inputs]
        self.optimizer.zero_grad(set_to_none=True)           # gradients are allocated inside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = self.forward(*self.static_inputs)
            outputs[0].backward()
            if self.after_backward is not None:
                self.after_backward()
            self.optimizer.step()
        self.graph, self.lrs = graph, lrs
        self.static_outputs = tuple(x.detach() for x in outputs)
