"""Paper defaults and the learning-rate schedule, against the values of the official code."""
import pytest

from coop_min.options import paper_epochs
from coop_min.train import TrainConfig, learning_rate, resolve


def test_lr_schedule_matches_dassl_constant_warmup_then_cosine():
    # Dassl ConstantWarmupScheduler + CosineAnnealingLR, W=1, E=10, run on torch (reference notes §5)
    official = [1e-5, 0.002, 0.001951, 0.001809, 0.001588, 0.001309, 0.001, 0.000691, 0.000412, 0.000191]
    cfg = TrainConfig(epochs=10)
    assert [round(learning_rate(e, cfg), 6) for e in range(10)] == official


@pytest.mark.parametrize("method,shots,name,epochs", [
    ("coop", 1, "Caltech101", 50), ("coop", 2, "DescribableTextures", 100), ("coop", 4, "EuroSAT", 100),
    ("coop", 8, "OxfordPets", 200), ("coop", 16, "Food101", 200), ("coop", 1, "ImageNet", 50),
    ("coop", 16, "ImageNet", 50), ("cocoop", 16, "Caltech101", 10), ("cocoop", 16, "ImageNet", 10)])
def test_paper_epochs_per_method_shots_and_dataset(method, shots, name, epochs):
    assert paper_epochs(method, shots, name) == epochs


def test_resolve_fills_method_defaults():
    coop = resolve(TrainConfig(device="cpu"), "Caltech101")
    assert (coop.n_ctx, coop.ctx_init, coop.batch_size, coop.epochs, coop.precision) == \
        (16, "", 32, 200, "fp32")
    cocoop = resolve(TrainConfig(method="cocoop", device="cpu"), "Caltech101")
    assert (cocoop.n_ctx, cocoop.ctx_init, cocoop.batch_size, cocoop.epochs) == (4, "a photo of a", 1, 10)
    assert resolve(TrainConfig(device="cuda"), "X").precision == "bf16"
