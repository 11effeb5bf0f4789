"""At bench.py's ViT-B/16 sizes (CoOp at 1000 classes, CoCoOp at batch 8 and 500 classes, ImageNet's
class names, bf16, length buckets as train.py --cuda-graph has them) the CUDA-graph train step equals
the eager step over steps that alternate two batches and change the learning rate: with
cuda_graph.SGD one capture serves both rates, with torch.optim.SGD the step is captured again. CUDA
only: `bash .ci/gpu graph` runs this file alone; random-init weights, so only agreement is checked."""
import sys
from pathlib import Path

import pytest
import torch

from coop_min.clip import CLIP, convert_dtype
from coop_min.cuda_graph import SGD, TrainStep
from coop_min.fast import FastConfig, FastPromptedCLIP
from coop_min.prompts import CoCoOpPromptLearner, CoOpPromptLearner, PromptConfig

# benchmarks/ is bench.py's folder of modules, registered by conftest.py
from benchmarks import checks  # noqa: E402
from benchmarks.methods import ARCHS, LR, MOMENTUM, WEIGHT_DECAY, classnames  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
STEPS, LR_CHANGE = 7, 4          # 2 eager warm-ups, a capture, replays; the lr halves from step 4 on


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return convert_dtype(CLIP(ARCHS["vit_b16"]).eval().requires_grad_(False).cuda(), torch.bfloat16)


def _train(clip, kind, classes, batch, optimizer, cuda_graph):
    """(each step's loss, the parameters' update, captures) of STEPS steps from the same start."""
    learner_cls, n_ctx = (CoCoOpPromptLearner, 4) if kind == "cocoop" else (CoOpPromptLearner, 16)
    learner = learner_cls(clip, classnames(classes), PromptConfig(method=kind, n_ctx=n_ctx, ctx_init=""), seed=1)
    model = FastPromptedCLIP(clip, learner, FastConfig(length_buckets=True)).train()
    params = model.trainable_parameters()
    opt = optimizer(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    step = TrainStep(lambda x, y: (model.loss(x, y, check_labels=False),), opt, cuda_graph=cuda_graph)
    captures, capture = [], step._capture
    step._capture = lambda *a: captures.append(1) or capture(*a)
    g = torch.Generator().manual_seed(2)
    r = ARCHS["vit_b16"].image_resolution
    images = torch.randn(batch, 3, r, r, generator=g).cuda()
    labels = torch.randint(0, classes, (batch,), generator=g).cuda()
    start, losses = checks.flat(params), []
    for i in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LR if i < LR_CHANGE else LR / 2
        losses.append(step(images, (labels + i % 2) % classes)[0].item())
    return torch.tensor(losses), checks.flat(params) - start, len(captures)


@pytest.mark.parametrize("kind,classes,batch", [("coop", 1000, 32), ("cocoop", 500, 8)])
@pytest.mark.parametrize("optimizer,captures", [(SGD, 1), (torch.optim.SGD, 2)])
def test_graph_steps_equal_eager_steps_at_bench_sizes(clip, kind, classes, batch, optimizer, captures):
    eager_losses, eager_update, _ = _train(clip, kind, classes, batch, optimizer, cuda_graph=False)
    graph_losses, graph_update, n = _train(clip, kind, classes, batch, optimizer, cuda_graph=True)
    assert n == captures                                   # cuda_graph.SGD: the lr change needs no capture
    tolerance = checks.TOLERANCE[torch.bfloat16]
    assert checks.rel_diff(graph_losses, eager_losses) <= tolerance, (graph_losses, eager_losses)
    assert checks.rel_diff(graph_update, eager_update) <= tolerance
    assert eager_update.norm() > 0                          # the steps did train
