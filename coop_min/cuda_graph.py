"""One SGD training step, run eagerly or captured once as a CUDA graph and replayed.

Why: at CoOp's sizes a step is bound by kernel launches and Python, not by arithmetic (the GPU idles
for most of an eager step; docs/performance.md). A CUDA graph records the step's few hundred
kernels once -- forward, backward and the optimizer update -- and replays them with one launch, so
the step costs about what the GPU computes.

What capture needs, and how the fast path gives it:
- static shapes: a fixed batch (training batches drop the last partial one) and class list; inputs
  are copied into static buffers, and a batch of another shape runs eagerly instead;
- no host reads of device values inside the step: EOT lengths are known on the host (the
  learner's `eot_list`, used by fast.py), the head skips its label check while capturing (checked
  on the host instead), the loss share of a data-parallel part is an input tensor;
- the learning rate on the device: torch.optim.SGD's update holds the lr as a constant, so a
  captured step would have to be captured again whenever Dassl's schedule changes it (every epoch).
  `SGD` below reads it from a device tensor instead, which the step fills before each replay, so
  one capture serves the whole run; with another optimizer the step is re-captured when lr changes;
- no CUDA calls from other threads counted against the capture: a DataLoader's pin-memory thread
  allocates pinned host memory whenever it prefetches, which the default "global" capture mode treats
  as an error (the capture fails, and the loader thread dies with it), so capture is "thread_local".
The first `warmup` calls (at least one) are ordinary eager steps on a side stream (they are real
training steps; they also create the momentum buffers, which a capture must never do, and let cuBLAS
and Triton choose and compile their kernels). A replay runs the same kernels as an eager step, so
the numbers are the same.
"""
import torch


class SGD(torch.optim.Optimizer):
    """torch.optim.SGD (momentum, weight decay, dampening 0, no Nesterov) whose step reads the
    learning rate from a device tensor, `lr_tensor`, filled from the param groups' lr by sync_lr().
    Equal to torch.optim.SGD up to fp32 rounding (p - lr * buf where torch fuses p + (-lr) * buf)."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "dampening": 0.0}
        super().__init__(params, defaults)
        device = self.param_groups[0]["params"][0].device
        self.lr_tensor = torch.full((len(self.param_groups),), float(lr), device=device)   # fp32

    def sync_lr(self):
        """Copy each group's lr into lr_tensor: a device op, outside any captured graph."""
        self.lr_tensor.copy_(torch.tensor([g["lr"] for g in self.param_groups]), non_blocking=True)

    def has_momentum_buffers(self):
        return all("momentum_buffer" in self.state[p] for g in self.param_groups for p in g["params"]
                   if g["momentum"] != 0)

    @torch.no_grad()
    def step(self):
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["momentum"] != 0:
                bufs = []
                for p, g in zip(params, grads):
                    state = self.state[p]
                    if "momentum_buffer" not in state:       # the first step: buf = d_p, as torch's
                        state["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                    bufs.append(state["momentum_buffer"])
                grads = bufs
            torch._foreach_sub_(params, torch._foreach_mul(grads, self.lr_tensor[i]))


class TrainStep:
    """step(*inputs) -> forward's outputs, detached, after loss.backward(), after_backward() and
    optimizer.step(). forward(*inputs) returns (loss, *extras). cuda_graph=True captures it.

    With a CUDA graph the returned tensors are static: read them before the next call."""

    def __init__(self, forward, optimizer, cuda_graph=False, after_backward=None, warmup=2):
        self.forward = forward
        self.optimizer = optimizer
        self.after_backward = after_backward
        self.cuda_graph = cuda_graph
        self.warmup = max(warmup, 1)
        self.device_lr = isinstance(optimizer, SGD)
        self.graph = None
        self.static_inputs = None
        self.static_outputs = None
        self.lrs = None

    def _eager(self, inputs):
        if self.device_lr:
            self.optimizer.sync_lr()
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
        if self.device_lr and not self.optimizer.has_momentum_buffers():
            return self._eager(inputs)                      # a capture must not create them
        lrs = None if self.device_lr else [group["lr"] for group in self.optimizer.param_groups]
        if self.graph is None or lrs != self.lrs:
            self._capture(inputs, lrs)
        if self.device_lr:
            self.optimizer.sync_lr()
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
        self.graph = graph
        self.lrs = lrs
        self.static_outputs = tuple(x.detach() for x in outputs)
