"""coop_min/fast.py pieces against the plain CLIP: prefix-KV attention, the fused copy, EOT truncation.
(The fast prompted classifier against the method: tests/test_prompts.py and test_elementwise.py.)"""
import pytest
import torch

from coop_min import fast
from coop_min.clip import CLIP, Attention, CLIPConfig, LayerNorm, QuickGELU, build_clip
from coop_min.tokenizer import tokenize


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _clip(seed=7):
    torch.manual_seed(seed)
    cfg = CLIPConfig(32, 32, 2, 64, 8, 2, 77, 49408, 64, 2, 3)
    return build_clip(CLIP(cfg).state_dict(), cfg)


def test_shared_prefix_path_equals_full_sequences():
    model = _clip()
    G, P, N = 2, 5, 6
    prefix = torch.randn(G, P, 64, requires_grad=True)
    suffix = torch.randn(N, 77 - P, 64)
    group = torch.tensor([0, 1, 1, 0, 1, 0])
    eot = torch.tensor([P, P + 3, P + 7, P + 1, P + 2, P + 9])
    prefixed = fast.encode_text_prefixed(model, prefix, suffix, eot, group)
    full = model.encode_text_embeddings(torch.cat([prefix[group], suffix], 1), eot)     # all 77 positions
    assert _rel(prefixed, full) < 1e-5
    g_prefixed, = torch.autograd.grad(prefixed.square().sum(), prefix)
    g_full, = torch.autograd.grad(full.square().sum(), prefix)
    assert _rel(g_prefixed, g_full) < 1e-5
    shared = fast.encode_text_prefixed(model, prefix[:1], suffix, eot)                  # one prefix for every row
    assert _rel(shared, model.encode_text_embeddings(torch.cat([prefix[:1].expand(N, -1, -1), suffix], 1), eot)) < 1e-5
    with pytest.raises(ValueError, match="inside the shared prefix"):
        fast.encode_text_prefixed(model, prefix, suffix, eot - P, group)


def test_text_cut_after_the_last_eot_equals_all_77_positions():
    model = _clip()
    tokens = tokenize(["a photo of a dog.", "a", "a much longer sentence about a golden retriever"])
    assert _rel(fast.encode_text(model, tokens), model.encode_text(tokens)) < 1e-5


def test_fused_copy_shares_the_weights_and_leaves_the_original_plain():
    model = _clip()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tokenize(["a photo of a dog.", "a much longer sentence about a golden retriever"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():                                # the original's numbers, before any copy exists
        image_before, text_before = model.encode_image(images), model.encode_text(tokens)
    fused = fast.fused_copy(model)
    assert fused is not model
    assert all(a is b for a, b in zip(model.parameters(), fused.parameters()))
    assert all(a is b for a, b in zip(model.buffers(), fused.buffers()))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in fused.named_parameters()]
    kinds = lambda m, cls: sum(type(x) is cls for x in m.modules())  # noqa: E731
    for cls in (LayerNorm, QuickGELU, Attention):
        assert kinds(model, cls) > 0 and kinds(fused, cls) == 0, cls            # all swapped in the copy
        assert sum(isinstance(x, cls) for x in fused.modules()) == kinds(model, cls), cls   # same places
        assert all(type(x) is cls for x in model.modules() if isinstance(x, cls)), cls      # the original plain
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])] == []   # weights untouched
    with torch.no_grad():                                # CPU: the swapped modules run the plain ops
        torch.testing.assert_close(fused.encode_image(images), image_before)
        torch.testing.assert_close(fused.encode_text(tokens), text_before)
        torch.testing.assert_close(model.encode_image(images), image_before)


def _first_ctx_gradient(model, images, labels):
    model.learner.zero_grad()
    model.loss(images, labels).backward()
    return torch.cat([p.grad.flatten() for p in model.trainable_parameters()])


@pytest.mark.parametrize("method,n_cls,batch,shared_prefix,buckets", [
    ("cocoop", 500, 2, False, False), ("cocoop", 500, 2, True, False), ("cocoop", 500, 2, False, True),
    ("coop", 1000, 4, False, False)])
def test_bf16_gradient_is_within_five_percent_of_the_fp32_method(method, n_cls, batch, shared_prefix, buckets):
    # The gradient of a context shared by hundreds of prompts is a sum over them: summed in bf16 (the
    # CoCoOp context gathered per prompt after its cast), it was 30% away from the exact one here.
    from coop_min.clip import convert_dtype
    from coop_min.prompts import PromptConfig, build_prompted_clip
    torch.manual_seed(0)
    cfg = CLIPConfig(64, 32, 2, 128, 8, 2, 77, 49408, 128, 2, 2)
    exact_clip = build_clip(CLIP(cfg).state_dict(), cfg)
    low_clip = convert_dtype(build_clip(exact_clip.state_dict(), cfg), torch.bfloat16)
    names = [f"class number {i}" for i in range(n_cls)]
    exact = build_prompted_clip(exact_clip, names, PromptConfig.for_method(method), seed=1)
    learner = build_prompted_clip(low_clip, names, PromptConfig.for_method(method), seed=1).learner
    low = fast.FastPromptedCLIP(low_clip, learner, fast.FastConfig(shared_prefix=shared_prefix, length_buckets=buckets))
    images, labels = torch.randn(batch, 3, 32, 32), torch.arange(batch) * 7
    g_exact, g_low = _first_ctx_gradient(exact, images, labels), _first_ctx_gradient(low, images, labels)
    assert (g_low - g_exact).norm() / g_exact.norm() < 0.05
