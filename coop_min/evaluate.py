"""`python -m coop_min.evaluate`: zero-shot CLIP, learned prompts, base-to-new, interpretation.

Image features are computed once per evaluation (the image encoder is frozen) and every classifier,
hand-crafted or learned, is scored on the same features. Metrics as Dassl's Classification
evaluator: top-1 accuracy (the number the papers report), macro-F1 over the classes present in the
labels, and per-class accuracy, all in percent.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from coop_min import data as D
from coop_min.prompts import PromptedCLIP, load_prompt, nearest_words
from coop_min.templates import templates_for

DEMO_TEMPLATE_NOTE = "the bundled demo benchmark and tiny CLIP"


# ----------------------------------------------------------------------------------------------
# metrics


def compute_metrics(pred, labels, classnames):
    """Accuracy, macro-F1 (over the classes present in `labels`) and per-class accuracy, in percent."""
    pred, labels = torch.as_tensor(pred).long(), torch.as_tensor(labels).long()
    present = torch.unique(labels).tolist()
    f1s, per_class = [], {}
    for c in present:
        tp = int(((pred == c) & (labels == c)).sum())
        n_true, n_pred = int((labels == c).sum()), int((pred == c).sum())
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true
        f1s.append(2 * precision * recall / (precision + recall) if tp else 0.0)
        per_class[classnames[c]] = 100.0 * recall
    return {"accuracy": 100.0 * float((pred == labels).float().mean()), "macro_f1": 100.0 * sum(f1s) / len(f1s),
            "per_class_accuracy": per_class, "total": len(labels), "correct": int((pred == labels).sum())}


def harmonic_mean(base, new):
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# features and classifiers


@torch.no_grad()
def extract_features(clip, loader, device):
    """Unnormalised image features (N, D) in fp32 and labels (N,) of a whole loader."""
    feats, labels = [], []
    for images, y in loader:
        feats.append(clip.encode_image(images.to(device, non_blocking=True)).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels).to(device)


@torch.no_grad()
def zero_shot_weights(clip, classnames, templates, device):
    """(C, D) normalised text classifier; several templates are averaged then re-normalised (CLIP's ensemble)."""
    from coop_min.tokenizer import tokenize

    total = 0
    for template in templates:
        texts = [template.format(name.replace("_", " ")) for name in classnames]
        total = total + F.normalize(clip.encode_text(tokenize(texts, clip.context_length).to(device)).float(), dim=-1)
    return F.normalize(total / len(templates), dim=-1)


@torch.no_grad()
def predict_zero_shot(feats, weights):
    return (F.normalize(feats, dim=-1) @ weights.t()).argmax(-1)


@torch.no_grad()
def predict_prompted(model: PromptedCLIP, feats, chunk=256):
    """Argmax classes of learned prompts on precomputed image features, in chunks of images (CoCoOp)."""
    model.eval()
    if not model.is_conditional:
        return model.logits_from_features(feats).argmax(-1)
    return torch.cat([model.logits_from_features(feats[i:i + chunk]).argmax(-1) for i in range(0, len(feats), chunk)])


# ----------------------------------------------------------------------------------------------
# reports


def format_table(rows, title):
    """rows: list of (name, metrics dict) -> aligned text table."""
    lines = [title, f"{'':<24}{'accuracy':>10}{'macro_f1':>10}{'images':>8}"]
    for name, m in rows:
        lines.append(f"{name:<24}{m['accuracy']:>9.2f}%{m['macro_f1']:>9.2f}%{m['total']:>8}")
    return "\n".join(lines)


def write_results(path, results):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
