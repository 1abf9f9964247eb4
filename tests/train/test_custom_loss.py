"""A loss registered from outside the package trains through the recipe key ``train.loss``."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import tiny_run_losses
from vlm2emb.losses import ContrastiveLoss, InfoNCELoss, register_loss, unregister_loss
from vlm2emb.train.config import ConfigError, load_recipe


class ScaledInfoNCE(ContrastiveLoss):
    """InfoNCE times a weight from ``train.loss_args``; counts its calls."""

    calls = 0

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight
        self.inner = InfoNCELoss()

    @classmethod
    def from_config(cls, train_cfg):
        return cls(weight=float(train_cfg.loss_args["weight"]))

    def training_loss(self, query, positive, negatives, batch, temperature):
        type(self).calls += 1
        assert query.shape == positive.shape and query.ndim == 2  # [b, d], row order
        return self.weight * self.inner.training_loss(query, positive, negatives, batch, temperature)


@pytest.fixture
def scaled_loss():
    register_loss("scaled_infonce", ScaledInfoNCE.from_config)
    ScaledInfoNCE.calls = 0
    yield "scaled_infonce"
    unregister_loss("scaled_infonce")


def _data(tmp_path):
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    rows = [{"query": {"text": f"the number {w}"}, "positive": {"text": w}} for w in words]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _first_loss(tmp_path, name, tiny_dir, data, *extra):
    return tiny_run_losses(tmp_path / name, tiny_dir, data, *extra)


def test_a_loss_registered_outside_the_package_trains(tmp_path, tiny_qwen2_vl_dir, scaled_loss):
    data = _data(tmp_path)
    plain = _first_loss(tmp_path, "plain", tiny_qwen2_vl_dir, data)
    scaled = _first_loss(
        tmp_path, "scaled", tiny_qwen2_vl_dir, data, f"train.loss={scaled_loss}", "train.loss_args.weight=3"
    )
    assert ScaledInfoNCE.calls == 2  # once per step
    # Same seed, same first batch, same weights: the first step's loss is 3x InfoNCE's (the
    # model's temperature reached the custom loss too: 0.05, not InfoNCELoss's default).
    assert scaled[0] == pytest.approx(3 * plain[0], rel=1e-4)
    # Adam's update does not depend on the gradient's scale: the runs stay in step.
    assert scaled[1] == pytest.approx(3 * plain[1], rel=1e-3)


def test_loss_registry_refuses_duplicates_and_names_unknown_losses(scaled_loss):
    from vlm2emb.losses import available_losses, build_loss, get_loss

    assert scaled_loss in available_losses() and "infonce" in available_losses()
    with pytest.raises(ValueError, match="already registered"):
        register_loss(scaled_loss, ScaledInfoNCE.from_config)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("infonce", ScaledInfoNCE.from_config)
    with pytest.raises(KeyError, match=r"unknown loss 'nope'; choose one of .*infonce"):
        get_loss("nope")
    with pytest.raises(ConfigError, match=r"train\.loss: unknown loss 'nope'"):
        load_recipe(None, ["data.train=demo:digits/train", "train.loss=nope"])
    cfg = load_recipe(
        None,
        [
            "data.train=demo:digits/train",
            "train.matryoshka_dims=[8]",
            f"train.loss={scaled_loss}",
            "train.loss_args={weight: 2}",
        ],
    )
    wrapped = build_loss(cfg.train)
    assert type(wrapped).__name__ == "MatryoshkaLoss" and isinstance(wrapped.loss, ScaledInfoNCE)
    assert wrapped.loss.weight == 2.0
    with pytest.raises(KeyError, match="was not registered"):
        unregister_loss("infonce")  # built-in losses stay


def test_the_model_owns_the_training_temperature(tiny_qwen2_vl_dir):
    """A loss built with another temperature than the model's is refused, not silently overridden."""
    from vlm2emb import EmbeddingModel
    from vlm2emb.gradcache import ContrastiveStep

    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides={"temperature": 0.05})
    assert model.config.temperature == 0.05
    ContrastiveStep(model, InfoNCELoss(temperature=0.05), gradcache=False, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="model owns the training temperature"):
        ContrastiveStep(model, InfoNCELoss(temperature=0.02), gradcache=False, device=torch.device("cpu"))
    model.enable_learnable_temperature(0.05)  # then the learned one is used whatever the loss says
    step = ContrastiveStep(model, InfoNCELoss(temperature=0.02), gradcache=False, device=torch.device("cpu"))
    assert step.learnable_temperature
