"""fast.bucket_cuts: the length-bucket plan is the cheapest (padded tokens + CHUNK_COST per chunk),
and on ImageNet's real class names (benchmarks/imagenet_classnames.txt, CoOp's classnames.txt) it
does cut: CoOp at 1000 classes and CoCoOp at batch 8 and 500 classes, as bench.py runs them."""
import random
from pathlib import Path

import pytest

from coop_min.fast import CHUNK_COST, bucket_cuts
from coop_min.tokenizer import tokenize

NAMES = Path(__file__).resolve().parents[1] / "benchmarks" / "imagenet_classnames.txt"


def _eots(n_classes, n_ctx):
    """EOT positions of the learner's prompts "X X ... X {name}." for ImageNet's first n_classes names."""
    names = [line.split(" ", 1)[1] for line in NAMES.read_text().splitlines()[:n_classes]]
    prompts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in names]
    return tokenize(prompts).argmax(dim=-1).tolist()


def _cost(chunks, chunk_cost):
    return sum(len(idx) * length + chunk_cost for idx, length in chunks)


def _assert_plan(chunks, eots, max_per_chunk):
    """Every prompt once, in length order, no chunk over the limit, each padded to its longest prompt."""
    order = [i for idx, _ in chunks for i in idx]
    assert sorted(order) == list(range(len(eots)))
    assert [eots[i] for i in order] == sorted(eots)
    for idx, length in chunks:
        assert 0 < len(idx) <= max_per_chunk and length == max(eots[i] for i in idx) + 1


@pytest.mark.parametrize("classes,n_ctx,batch", [(1000, 16, 1),    # CoOp: SOS, 16 ctx, name, ".", EOT
                                              (500, 4, 8)])      # CoCoOp: a prompt per (image, class)
def test_plan_on_imagenet_names_cuts_twice_and_pads_less_than_one_chunk(classes, n_ctx, batch):
    eots, case = _eots(classes, n_ctx) * batch, f"c{classes} b{batch}"
    chunks = bucket_cuts(eots, 4096)
    _assert_plan(chunks, eots, 4096)
    one_chunk = len(eots) * (max(eots) + 1)
    padded = sum(len(idx) * length for idx, length in chunks)
    assert len(chunks) >= 3, (case, [(len(idx), length) for idx, length in chunks])
    assert padded + len(chunks) * CHUNK_COST < one_chunk + CHUNK_COST, case    # worth its chunks, too


def _brute_force(eots, max_per_chunk, chunk_cost):
    """The cheapest of every way to cut the sorted prompts into consecutive chunks."""
    lengths, n = sorted(e + 1 for e in eots), len(eots)
    best = None
    for mask in range(1 << (n - 1)):
        cuts = [0, *(i + 1 for i in range(n - 1) if mask >> i & 1), n]
        if all(b - a <= max_per_chunk for a, b in zip(cuts, cuts[1:])):
            cost = sum((b - a) * lengths[b - 1] + chunk_cost for a, b in zip(cuts, cuts[1:]))
            best = cost if best is None else min(best, cost)
    return best


def test_plan_is_the_optimum_of_a_brute_force_on_small_inputs():
    rng = random.Random(0)
    for _ in range(400):
        eots = [rng.randint(3, 9) for _ in range(rng.randint(1, 10))]
        max_per_chunk, chunk_cost = rng.randint(1, 6), rng.choice([0, 1, 2, 5, 30])
        chunks = bucket_cuts(eots, max_per_chunk, chunk_cost)
        _assert_plan(chunks, eots, max_per_chunk)
        assert _cost(chunks, chunk_cost) == _brute_force(eots, max_per_chunk, chunk_cost), (eots, max_per_chunk)


def test_equal_lengths_fill_chunks_to_the_limit_and_a_free_chunk_is_taken():
    assert [len(idx) for idx, _ in bucket_cuts([5] * 10, 4, 1)] == [4, 4, 2]
    assert bucket_cuts([5, 5, 9], 4, 0) == [([0, 1], 6), ([2], 10)]       # no chunk cost: every cut pays
    assert bucket_cuts([5, 5, 9], 4, 7) == [([0, 1], 6), ([2], 10)]       # a cut saves 8 padded tokens
    assert bucket_cuts([5, 5, 9], 4, 9) == [([0, 1, 2], 10)]              # a chunk costs more than that
    assert bucket_cuts([], 4) == []
