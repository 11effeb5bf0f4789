"""evaluate.py's metrics and zero-shot classifier against values worked out by hand."""
import pytest
import torch
import torch.nn.functional as F

from coop_min.clip import CLIP, CLIPConfig
from coop_min.evaluate import compute_metrics, harmonic_mean, zero_shot_weights
from coop_min.options import from_run
from coop_min.tokenizer import tokenize


def test_metrics_by_hand():
    """labels 0 0 1 1 2 3, predictions 0 1 1 1 0 4 (class 4 is predicted but never a label):
    class 0: P 1/2 R 1/2 F1 1/2; class 1: P 2/3 R 1 F1 4/5; classes 2, 3: F1 0. Macro over the
    four classes present: (1/2 + 4/5) / 4 = 32.5%; accuracy 3/6."""
    m = compute_metrics(torch.tensor([0, 1, 1, 1, 0, 4]), torch.tensor([0, 0, 1, 1, 2, 3]), list("abcde"))
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["macro_f1"] == pytest.approx(32.5)
    assert m["per_class_accuracy"] == pytest.approx({"a": 50.0, "b": 100.0, "c": 0.0, "d": 0.0})
    assert (m["total"], m["correct"]) == (6, 3)
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140) and harmonic_mean(0.0, 0.0) == 0.0


def test_template_ensemble_averages_normalised_features_then_renormalises():
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(32, 32, 1, 64, 8, 2, 77, 49408, 64, 2, 2)).eval().requires_grad_(False)
    names, templates = ["red_panda", "dog"], ["a photo of a {}.", "a sketch of the {}.", "{}"]
    w = zero_shot_weights(clip, names, templates, "cpu")
    with torch.no_grad():                      # CLIP's prompt ensembling, written out per template
        per_template = [clip.encode_text(tokenize([t.format(n.replace("_", " ")) for n in names]))
                        for t in templates]
        mean = sum(f / f.norm(dim=-1, keepdim=True) for f in per_template) / len(templates)
    assert torch.allclose(w, mean / mean.norm(dim=-1, keepdim=True), atol=1e-6)
    assert not torch.allclose(w, F.normalize(sum(per_template), dim=-1), atol=1e-4)  # the norms matter here


def test_evaluate_takes_from_a_run_the_settings_its_options_declare_unless_given():
    """evaluate --prompt RUN_DIR: the run's data, dataset, weights and precision when not given; the
    dataset only with the run's data; a setting the run left to its default (None) stays unset."""
    saved = {"data": "/d", "dataset": "imagefolder", "weights": "w.safetensors", "precision": "bf16",
             "seed": 3, "shots": 4, "templates": "ensemble"}
    unset = {"data": None, "dataset": "auto", "weights": None, "precision": None, "templates": "single"}
    assert from_run(saved, unset) == {"data": "/d", "dataset": "imagefolder", "weights": "w.safetensors",
                                      "precision": "bf16"}
    assert from_run(saved, {**unset, "data": "/other"}) == {"weights": "w.safetensors", "precision": "bf16"}
    assert from_run(saved, {**unset, "data": "/d"}) == {"dataset": "imagefolder", "weights": "w.safetensors",
                                                         "precision": "bf16"}
    assert from_run(saved, {**unset, "weights": "x", "dataset": "dtd"}) == {"data": "/d", "precision": "bf16"}
    assert from_run({**saved, "weights": None}, unset).keys() == {"data", "dataset", "precision"}
