"""TrainStep: a CoOp / CoCoOp SGD step replayed from a CUDA graph equals the eager step, across a
learning-rate change (a re-capture) and a batch of another shape (an eager fallback). CUDA only;
the preconditions of capture (no host reads in the step) are checked on CPU in test_prompts.py."""
import threading

import pytest
import torch

from coop_min.clip import CLIP, CLIPConfig
from coop_min.cuda_graph import TrainStep
from coop_min.prompts import PromptConfig, build_prompted_clip

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
NAMES = ["dog", "golden retriever", "2012 Tesla Model S", "cat", "red panda"]


def _model(method):
    torch.manual_seed(0)
    config = CLIPConfig(32, 32, 2, 64, 8, 2, 77, 49408, 64, 2, 2)
    clip = CLIP(config).eval().requires_grad_(False).cuda()
    model = build_prompted_clip(clip, NAMES, PromptConfig.for_method(method), seed=1).train()
    with torch.no_grad():                      # a Meta-Net that matters from the first step
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).cuda() * 0.05)
    return model


def _run(method, cuda_graph, batches):
    model = _model(method)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(lambda x, y: (model.loss(model.encode_images(x), y),), opt, cuda_graph=cuda_graph)
    losses = []
    for i, (x, y) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = 0.002 if i < 5 else 0.0005
        losses.append(step(x, y)[0].item())
    return [p.detach().clone() for p in model.trainable_parameters()], losses


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_graph_replay_equals_eager_steps(method):
    g = torch.Generator().manual_seed(2)
    sizes = [4] * 8 + [3] + [4] * 2               # the batch of 3 cannot replay the graph: eager
    batches = [(torch.randn(n, 3, 32, 32, generator=g).cuda(), torch.randint(0, 5, (n,), generator=g).cuda())
               for n in sizes]
    eager, eager_losses = _run(method, False, batches)
    graphed, graphed_losses = _run(method, True, batches)
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)
    moved = max((a - b).abs().max().item() for a, b in zip(eager, _run(method, False, batches[:1])[0]))
    assert moved > 1e-4                        # the steps really changed the parameters
    for a, b in zip(graphed, eager):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()


def test_capture_survives_a_pinned_allocation_in_another_thread():
    """train.py's DataLoader pins each batch in a thread of its own, also while a step is captured. A
    pinned allocation there (cudaHostAlloc) breaks a capture in CUDA's default "global" mode and
    kills the loader thread; TrainStep captures "thread_local", so both go on."""
    errors = []

    def pin_fresh_block():              # a size no cached pinned block has: a real cudaHostAlloc
        try:
            torch.empty(97 * 2 ** 20 + 13, dtype=torch.uint8, pin_memory=True)
        except Exception as e:          # noqa: BLE001 (reported below)
            errors.append(e)

    def losses(cuda_graph):
        model = _model("coop")

        def forward(x, y):
            if torch.cuda.is_current_stream_capturing():
                thread = threading.Thread(target=pin_fresh_block)
                thread.start()
                thread.join()
            return (model.loss(model.encode_images(x), y),)
        step = TrainStep(forward, torch.optim.SGD(model.trainable_parameters(), lr=0.002, momentum=0.9),
                         cuda_graph=cuda_graph)
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)).cuda()
        y = torch.arange(4).cuda()
        out = [step(x, y)[0].item() for _ in range(4)]        # graphed: 2 eager, a capture, a replay
        assert step.graph is not None or not cuda_graph
        return out

    graphed = losses(True)
    assert not errors, errors
    assert graphed == pytest.approx(losses(False), rel=1e-5)



def test_device_lr_sgd_is_captured_once_for_every_learning_rate(monkeypatch):
    """With cuda_graph.SGD the lr lives on the device: the lr change after step 5 needs no re-capture,
    and replays equal eager steps of the same optimizer."""
    from coop_min.cuda_graph import SGD

    captures = []
    original = TrainStep._capture
    monkeypatch.setattr(TrainStep, "_capture", lambda self, *a: captures.append(1) or original(self, *a))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g).cuda(),
                torch.randint(0, len(NAMES), (4,), generator=g).cuda())
               for _ in range(9)]
    out = {}
    for cuda_graph in (False, True):
        model = _model("coop")
        opt = SGD(model.trainable_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
        step = TrainStep(lambda x, y: (model.loss(model.encode_images(x), y),), opt, cuda_graph=cuda_graph)
        for i, (x, y) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = 0.002 if i < 5 else 0.0005
            step(x, y)
        out[cuda_graph] = [p.detach().clone() for p in model.trainable_parameters()]
    assert len(captures) == 1
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
