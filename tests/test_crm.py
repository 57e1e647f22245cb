"""DCNv2 layers and the stage-1 trainer: shapes, the cross formula, learning, resuming."""

from pathlib import Path

import numpy as np
import pytest
import torch

from training.crm_trainer import CRMTrainConfig, load_crm, predict
from training.dcnv2 import CrossLayer, DCNv2, DCNv2Config, LowRankMixtureCrossLayer
from training.runs import DataConfig, prepare_data, run_crm_stage


def test_cross_layer_formula():
    layer = CrossLayer(4)
    x0, x = torch.randn(3, 4), torch.randn(3, 4)
    expected = x0 * (x @ layer.linear.weight.T + layer.linear.bias) + x
    assert torch.allclose(layer(x0, x), expected)
    mix = LowRankMixtureCrossLayer(8, rank=2, num_experts=3)
    assert mix(torch.randn(5, 8), torch.randn(5, 8)).shape == (5, 8)


@pytest.mark.parametrize("rank", [None, 4])
def test_dcnv2_shapes(synthetic_dir, rank):
    prepared = prepare_data(DataConfig(source=str(synthetic_dir), history_length=5))
    model = DCNv2(prepared.spec, DCNv2Config(embedding_dim=8, cross_rank=rank))
    batch = {k: torch.from_numpy(v[:7]) for k, v in prepared.inputs.items()}
    logit, layers = model.forward_with_layers(**batch)
    assert logit.shape == (7,) and len(layers) == 3
    assert all(layer.shape == (7, model.input_dim) for layer in layers)


def test_crm_learns_the_signal_and_resumes(synthetic_dir, tmp_path):
    data = DataConfig(source=str(synthetic_dir), history_length=5)
    train = CRMTrainConfig(epochs=2, batch_size=64, learning_rate=5e-3, patience=5)
    out = tmp_path / "run"
    _, prepared, first = run_crm_stage(out, data, DCNv2Config(embedding_dim=8), train, show_progress=False)
    assert first["fit"]["epochs_run"] == 2
    for name in (
        "model.safetensors",
        "last.safetensors",
        "state.pt",
        "config.json",
        "features.json",
    ):
        assert (out / "crm" / name).exists()
    # resume to 8 epochs: the history continues from epoch 3 instead of starting over
    longer = train.model_copy(update={"epochs": 8})
    _, _, resumed = run_crm_stage(out, data, None, longer, resume=True, show_progress=False)
    import json

    history = json.loads((out / "crm" / "history.json").read_text())
    assert [h["epoch"] for h in history][:3] == [1, 2, 3]
    assert resumed["test"]["overall"]["auc"] > 0.75  # the generated taste signal is learnable
    model, spec = load_crm(out / "crm")
    test_rows = prepared.rows("test")
    again = predict(model, prepared.take(test_rows))
    assert np.isfinite(again).all() and spec.to_dict() == prepared.spec.to_dict()


def test_crm_on_movielens_100k_reaches_the_paper_level(ml100k_dir, tmp_path: Path):
    """The Foundation's bar: test AUC >= 0.65 on the global temporal split."""
    _, _, metrics = run_crm_stage(
        tmp_path / "ml",
        DataConfig(source=str(ml100k_dir)),
        show_progress=False,
        train_config=CRMTrainConfig(epochs=3, patience=1),
    )
    assert metrics["test"]["overall"]["auc"] >= 0.65
    assert metrics["test_share_unseen_users"] == pytest.approx(0.86, abs=0.01)
    deciles = metrics["test"]["entropy_deciles"]
    assert deciles[0]["crm_acc"] > deciles[-1]["crm_acc"]  # confident predictions are right more often


class _Payload:
    """What a hostile run folder could pickle: loading it must not build it."""

    built = False

    def __reduce__(self):  # noqa: ANN204
        return (_Payload._build, ())

    @staticmethod
    def _build() -> "_Payload":
        _Payload.built = True
        return _Payload()


def test_checkpoints_load_plain_values_only(tmp_path):
    import torch

    from runtime.errors import ConfigError
    from training.checkpoint import load_state, numpy_rng_state, save_state, set_numpy_rng_state

    np.random.seed(3)
    save_state(tmp_path / "ok.pt", {"numpy_rng": numpy_rng_state(), "step": 4, "t": torch.ones(2)})
    expected = np.random.random(3)
    np.random.seed(99)
    state = load_state(tmp_path / "ok.pt")
    set_numpy_rng_state(state["numpy_rng"])
    assert np.array_equal(np.random.random(3), expected) and state["step"] == 4
    torch.save({"evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="evil.pt: holds more than tensors"):
        load_state(tmp_path / "evil.pt")
    assert not _Payload.built
