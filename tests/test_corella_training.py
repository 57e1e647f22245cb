"""The three-stage CoReLLa procedure on a tiny LLaMA GGUF and a few hundred generated interactions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.errors import ConfigError
from runtime.prompt import HistoryEntry, ItemText, PromptTemplate
from training.llm import LLMScorer, LoRAConfig, resolve_base_llm
from training.pipeline import CoReLLaConfig, train_corella
from training.report import compare_runs

from .tiny_llm import write_tiny_hf_directory, write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")


def _config(synthetic_dir: Path, tiny_gguf: Path, **joint) -> CoReLLaConfig:
    return CoReLLaConfig(
        source=str(synthetic_dir),
        history_length=5,
        llm=str(tiny_gguf),
        crm={"embedding_dim": 8},
        crm_train={"epochs": 2, "batch_size": 64},
        joint={"stage2_samples": 48, "stage3_samples": 16, "batch_size": 4, "group_size": 4, "checkpoint_every": 2}
        | joint,
        eval_samples=60,
        max_prompt_tokens=400,
    )


def test_two_token_readout_equals_softmax_of_full_logits(tiny_gguf):
    scorer = LLMScorer.load(resolve_base_llm(str(tiny_gguf)), PromptTemplate(), LoRAConfig())
    prompts = [scorer.prompt_ids([HistoryEntry(ItemText("Movie Number 1"), 5.0)], ItemText("Movie Number 3")),
               scorer.prompt_ids([], ItemText("Movie Number 2"))]  # fmt: skip
    assert prompts[1][0] == scorer.bos_id and len(prompts[0]) > len(prompts[1])
    batch = scorer.collate(prompts)
    assert batch["attention_mask"][1, 0] == 0  # left padded
    with torch.no_grad():
        diff, _ = scorer(**batch)
        full = scorer._causal_lm()(**batch).logits[:, -1]
    expected = torch.softmax(full[:, [scorer.yes_id, scorer.no_id]], dim=-1)[:, 0]
    assert torch.allclose(torch.sigmoid(diff), expected, atol=1e-6)
    # each prompt alone gives the same answer as inside the padded batch
    with torch.no_grad():
        alone, _ = scorer(**scorer.collate(prompts[1:]))
    assert torch.allclose(alone, diff[1:], atol=1e-4)


def test_unknown_llm_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="gemma3-270m"):
        resolve_base_llm(str(tmp_path / "nope.gguf"))


class _Interrupt(Exception):
    pass


def test_three_stages_run_end_to_end_and_resume(synthetic_dir, tiny_gguf, tmp_path, monkeypatch):
    config = _config(synthetic_dir, tiny_gguf)
    out = tmp_path / "run"
    calls = {"n": 0}
    original = LLMScorer.forward_groups

    def crashing_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # in stage 2 (a group of 4 a step), after the checkpoint of step 6
            raise _Interrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LLMScorer, "forward_groups", crashing_forward)
    with pytest.raises(_Interrupt):
        train_corella(out, config, show_progress=False)
    monkeypatch.setattr(LLMScorer, "forward_groups", original)
    with pytest.raises(ConfigError, match="--resume"):
        train_corella(out, config, show_progress=False)
    metrics = train_corella(out, config, resume=True, show_progress=False)

    steps = [r["step"] for r in json.loads((out / "stage2" / "losses.json").read_text())["losses"]]
    # 48 samples in groups of up to 4 a user, whole groups packed into steps of 4 or more: every step
    # once, none repeated
    stage2 = metrics["stages"]["stage2"]
    assert stage2["samples"] == 48 and 9 <= stage2["steps"] <= 12 and steps == list(range(1, stage2["steps"] + 1))
    assert metrics["stages"]["stage3"]["samples"] == 16
    for name in ("metrics.json", "report.md", "auc_vs_fraction.png", "auc_by_entropy_decile.png",
                 "final/llm/adapter.safetensors", "final/crm/model.safetensors", "final/prompt.json",
                 "final/router.json", "eval_predictions.npz"):  # fmt: skip
        assert (out / name).exists(), name
    assert metrics["eval_subset"]["count"] == 60
    hybrid = {row["fraction"]: row for row in metrics["hybrid"]}
    raw = {row["fraction"]: row for row in metrics["hybrid_raw"]}
    assert raw[1.0]["auc"] == pytest.approx(metrics["llm_only"]["auc"])
    assert hybrid[1.0]["logloss"] == pytest.approx(metrics["llm_only_calibrated"]["logloss"])
    assert hybrid[1.0]["routed"] == 60 and hybrid[0.5]["routed"] == pytest.approx(30, abs=12)
    assert hybrid[0.01]["routed"] == raw[0.01]["routed"]
    router = json.loads((out / "final" / "router.json").read_text())
    assert router["fraction"] == 0.1 and np.isfinite(router["threshold"])
    full = metrics["full_test"]  # the hybrid on the whole test split: the LLM scored wherever f <= 0.1 routes
    assert full["count"] == metrics["crm_full_test"]["count"] == 180
    assert [r["fraction"] for r in full["hybrid"]] == [0.01, 0.02, 0.05, 0.1]
    # the threshold is validation's 10% quantile of entropy; the later test users have longer
    # pasts, so fewer of them are as uncertain: some, never more than twice the share
    assert full["hybrid"][-1]["routed"] == full["llm_scored"]
    assert 1 <= full["llm_scored"] <= 36
    assert full["crm_only"]["auc"] == pytest.approx(metrics["crm_full_test"]["auc"])
    assert router["llm_calibration"]["samples"] == metrics["llm_calibration"]["samples"] > 0
    saved = np.load(out / "eval_predictions.npz")  # every answer the figures came from, for offline analysis
    assert len(saved["calibration_llm"]) == len(saved["calibration_crm"]) == router["llm_calibration"]["samples"]
    assert len(saved["routed_test_llm"]) == full["llm_scored"] and np.isfinite(saved["routed_test_llm"]).all()
    from benchmarks.calibration_variants import variants

    judged = variants(dict(saved))  # the platt variant is what the run served: the same figure
    assert judged["platt"]["auc_gain"] == pytest.approx(full["gain_over_crm"]["calibrated"]["gain"], abs=1e-9)
    assert judged["blend"]["llm_weight"] >= 0 and all(v["low"] <= v["auc_gain"] <= v["high"] for v in judged.values())
    adapter_keys = __import__("safetensors.torch").torch.load_file(str(out / "final/llm/adapter.safetensors"))
    assert any("lora_A" in k for k in adapter_keys)


def test_alignment_loss_falls_during_stage_2(synthetic_dir, tiny_gguf, tmp_path):
    config = _config(synthetic_dir, tiny_gguf, stage2_samples=96, stage3_samples=0, checkpoint_every=50)
    train_corella(tmp_path / "run", config, show_progress=False)
    losses = json.loads((tmp_path / "run" / "stage2" / "losses.json").read_text())["losses"]
    align = [r["align"] for r in losses]
    assert 20 <= len(align) <= 24  # 96 samples, whole groups of up to 4 packed into steps of 4 or more
    assert np.mean(align[-5:]) < 0.8 * np.mean(align[:5])


def test_ablations_share_the_evaluation_subset(synthetic_dir, tiny_gguf, tmp_path):
    full = _config(synthetic_dir, tiny_gguf, stage2_samples=8, stage3_samples=4)
    alone = _config(synthetic_dir, tiny_gguf, stage2_samples=8, stage3_samples=4, llm_alone=True)
    train_corella(tmp_path / "full", full, show_progress=False)
    metrics = train_corella(tmp_path / "alone", alone, crm_run=tmp_path / "full", show_progress=False)
    assert metrics["ablation"] == "llm-alone (TALLRec)" and metrics["crm_choice"]["used"] == "stage1"
    columns, rows = compare_runs([tmp_path / "full", tmp_path / "alone"])
    assert [r[1] for r in rows] == ["full CoReLLa", "llm-alone (TALLRec)"]
    assert columns.index("full test: hybrid@0.1 AUC") and all(np.isfinite(r[columns.index("full test: CRM AUC")])
                                                              for r in rows)  # fmt: skip
    from typer.testing import CliRunner

    from corella_cli.main import app

    shown = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["train", "compare", str(tmp_path / "full"),
                                                           str(tmp_path / "alone")])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert "llm-alone (TALLRec)" in shown.output and "full test: hybrid@0.1 AUC" in shown.output
    other = _config(synthetic_dir, tiny_gguf, stage2_samples=8, stage3_samples=4).model_copy(
        update={"eval_samples": 30}
    )
    train_corella(tmp_path / "other", other, crm_run=tmp_path / "full", show_progress=False)
    with pytest.raises(ConfigError, match="different test subsets"):
        compare_runs([tmp_path / "full", tmp_path / "other"])
    # the learning curve: one point per run, by how many samples its LLM saw
    more = _config(synthetic_dir, tiny_gguf, stage2_samples=16, stage3_samples=8, llm_samples="uncertain")
    train_corella(tmp_path / "more", more, crm_run=tmp_path / "full", show_progress=False)
    assert "uncertain training interactions" in (tmp_path / "more" / "report.md").read_text().replace("\n", " ")
    curve = ["train", "curve", str(tmp_path / "more"), str(tmp_path / "full"), "--out", str(tmp_path / "curve")]
    shown = CliRunner(env={"COLUMNS": "200"}).invoke(app, curve)
    assert shown.exit_code == 0, shown.output
    table = (tmp_path / "curve" / "curve.md").read_text().splitlines()
    assert [line.split(" | ")[0].strip("| ") for line in table[4:]] == ["12", "24"]  # sorted by samples
    assert table[4].endswith("| full |") and (tmp_path / "curve" / "curve.png").stat().st_size > 5000
    missing = CliRunner().invoke(app, ["train", "curve", str(tmp_path / "nothing")])
    assert missing.exit_code != 0 and "not a finished training run" in missing.output


def test_a_hugging_face_directory_base_trains_the_same_way(synthetic_dir, tiny_gguf, tmp_path):
    hf = write_tiny_hf_directory(tmp_path / "tiny-hf", tiny_gguf)
    config = _config(synthetic_dir, tiny_gguf, stage2_samples=8, stage3_samples=4).model_copy(update={"llm": str(hf)})
    metrics = train_corella(tmp_path / "run", config, show_progress=False)
    llm = json.loads((tmp_path / "run" / "final" / "llm" / "llm.json").read_text())
    assert llm["base_is_gguf"] is False and llm["base_path"] == str(hf.resolve())
    assert metrics["stages"]["stage2"]["samples"] == 8 and np.isfinite(metrics["llm_only"]["auc"])
    # the same answers as the GGUF it was made from: one model, two formats
    gguf_scorer = LLMScorer.load(resolve_base_llm(str(tiny_gguf)), PromptTemplate(), None)
    hf_scorer = LLMScorer.load(resolve_base_llm(str(hf)), PromptTemplate(), None)
    ids = gguf_scorer.prompt_ids([], ItemText("Movie Number 3"))
    assert hf_scorer.prompt_ids([], ItemText("Movie Number 3")) == ids
    with torch.no_grad():
        a, _ = gguf_scorer(**gguf_scorer.collate([ids]))
        b, _ = hf_scorer(**hf_scorer.collate([ids]))
    assert torch.allclose(a, b, atol=1e-5)
    # its export needs llama.cpp's converter, and says how to get it
    from export.bundle import ExportConfig, export_bundle
    from export.crm import ExportError

    with pytest.raises(ExportError, match="--fetch-converter"):
        export_bundle(tmp_path / "run", tmp_path / "bundle", ExportConfig(quant="q8_0", parity_prompts=4))
