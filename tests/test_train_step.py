"""cuda_graph.SGD, the optimizer that keeps the learning rate on the device, against torch.optim.SGD;
TrainStep's guard against capturing the first step (CPU; the CUDA graph tests: test_cuda_graph.py);
and train's host check of the labels, which a captured step cannot make."""
import pytest
import torch

from coop_min import train
from coop_min.cuda_graph import TrainStep


def test_device_lr_sgd_equals_torch_sgd_over_many_steps_with_momentum_and_weight_decay():
    """cuda_graph.SGD reads lr from a device tensor (so one capture serves every epoch's lr); over 60
    steps with a changing lr it must track torch.optim.SGD to fp32 rounding."""
    from coop_min.cuda_graph import SGD

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]
    ours = [p.clone().requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    opt_ours = SGD(ours, lr=0.002, momentum=0.9, weight_decay=5e-4)
    opt_ref = torch.optim.SGD(ref, lr=0.002, momentum=0.9, weight_decay=5e-4)
    target = torch.randn(16, 8, generator=g)
    for step in range(60):
        for opt in (opt_ours, opt_ref):
            for group in opt.param_groups:
                cosine = torch.cos(torch.tensor(step / 60 * 3.1416)).item()
                group["lr"] = 1e-5 if step < 5 else 0.001 * (1 + cosine)
        for params, opt in ((ours, opt_ours), (ref, opt_ref)):
            loss = ((params[0] + params[1] - target) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            if opt is opt_ours:
                opt.sync_lr()
            opt.step()
    for a, b, s in zip(ours, ref, start):
        assert (a - s).abs().max() > 1e-3                                   # the parameters really moved
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(opt_ours.state[a]["momentum_buffer"], opt_ref.state[b]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-7)


class _CPUCapture(TrainStep):
    """TrainStep whose capture, the CUDA graph's part, is a stand-in that runs on the CPU: it records
    whether the optimizer held its momentum buffers when the capture began, and its "graph" replays
    the eager step on the static inputs. Everything that decides when to capture is TrainStep's own."""

    def _capture(self, inputs, lrs):
        self.captured_with_buffers = self.optimizer.has_momentum_buffers()
        self.static_inputs = [x.clone() for x in inputs]
        self.graph, self.lrs = self, lrs

    def replay(self):
        self.static_outputs = self._eager(self.static_inputs)


def test_a_capture_never_creates_the_momentum_buffers():
    """warmup=0 is raised to one eager step, and a step whose optimizer still lacks its momentum
    buffers runs eagerly: a captured first step would create them inside the graph's memory."""
    from coop_min.cuda_graph import SGD

    p = torch.zeros(3, requires_grad=True)
    step = _CPUCapture(lambda: ((p * 2).sum(),), SGD([p], lr=0.1, momentum=0.9), cuda_graph=True, warmup=0)
    assert step.warmup == 1
    assert not step.optimizer.has_momentum_buffers()
    step.warmup = 0                      # past the warm-up (a CUDA side stream) with no buffers made yet
    step()
    assert step.graph is None, "captured a step whose optimizer had no momentum buffers yet"
    assert step.optimizer.has_momentum_buffers()                            # the eager step made them
    step()
    assert step.graph is not None and step.captured_with_buffers            # then captured, with them
    # two SGD steps of d(2 sum p)/dp = 2, momentum 0.9: buf 2 then 3.8, p = -0.1 * 2 - 0.1 * 3.8
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.58), rtol=0, atol=1e-6)


@pytest.mark.parametrize("labels", [[0, 4, 2, 4], [3], []])
def test_labels_in_range_pass_the_host_check(labels):
    train._check_labels(torch.tensor(labels, dtype=torch.long), 5)


@pytest.mark.parametrize("labels,shown", [([0, 5, 2], "[0, 5, 2]"), ([-1, 3], "[-1, 3]"), ([9], "[9]")])
def test_labels_out_of_range_are_refused_naming_the_range(labels, shown):
    with pytest.raises(ValueError) as e:
        train._check_labels(torch.tensor(labels, dtype=torch.long), 5)
    assert "[0, 5)" in str(e.value) and shown in str(e.value), e.value
