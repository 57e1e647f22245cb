"""train -> export on tiny models: ONNX and GGUF parity, the bundle's integrity checks."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.bundle import ExportConfig, export_bundle
from export.crm import ExportError
from runtime.artifacts.bundle import BundleError, load_bundle
from runtime.errors import ConfigError
from runtime.llm import LlamaScorer


def test_bundle_holds_every_file_and_the_parity_figures(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["files"]) == {"crm.onnx", "features.json", "prompt.json", "store.sqlite", "llm-q8_0.gguf"}
    assert manifest["crm"]["parity"]["samples"] == 180  # the whole validation split (10% of 1,800)
    assert manifest["crm"]["parity"]["max_abs_dp"] <= 1e-5
    assert manifest["crm"]["tensorrt"]["status"] == "skipped" and manifest["crm"]["tensorrt"]["reason"]
    llm = manifest["llm"]
    assert llm["parity"]["mean_abs_dp"] <= 0.01 and llm["parity"]["same_token_ids"] == 1.0
    assert llm["merge"]["merged_tensors"] == 4 * 4  # q, k, v, o in 4 blocks
    assert set(llm["quantizations"]) == {"f16", "q8_0", "q4_k_m"}
    assert llm["quantizations"]["q8_0"]["mean_abs_dp_vs_f16"] < 0.05
    assert manifest["router"]["fraction"] == 0.1
    # what the LLM is worth: cross-fitted on the routed validation samples scored by the shipped GGUF
    gain = manifest["router"]["expected_gain"]
    assert gain["routed_scored"] == llm["routed_validation_samples"] == manifest["router"]["llm_calibration"]["samples"]
    assert gain["low"] <= gain["auc_gain"] <= gain["high"] and gain["measured_with"] == "llm-q8_0.gguf"
    assert gain["rows"] == 180 - int(np.sum(_routed_validation(bundle))) + gain["routed_scored"]
    assert gain["llm_ms_per_routed_candidate"] > 0 and 1 <= llm["routed_prefixes"] <= gain["routed_scored"]
    assert manifest["metrics"]["hybrid"]["count"] == 40
    assert manifest["store_counts"]["interactions"] == 120 * 15
    assert load_bundle(bundle).spec.history_length == 5


def _routed_validation(bundle: Path) -> np.ndarray:
    """The router's mask over the validation split of the bundle's run, by the bundle's own CRM."""
    from runtime.crm import CRMSession
    from runtime.router import binary_entropy
    from training.checkpoint import read_json
    from training.runs import DataConfig, prepare_data

    manifest = json.loads((bundle / "manifest.json").read_text())
    run = Path(manifest["source_run"])
    prepared = prepare_data(DataConfig(**read_json(run / "run.json")["data"]), load_bundle(bundle).spec)
    p = CRMSession(bundle / "crm.onnx", ["cpu"]).predict(prepared.take(prepared.rows("valid")))
    return binary_entropy(p) > manifest["router"]["threshold"]


def test_merged_gguf_keeps_metadata_and_changes_only_adapted_tensors(trained_run, bundle, tmp_path):
    import gguf

    from training.checkpoint import read_json

    base = gguf.GGUFReader(read_json(trained_run / "final/llm/llm.json")["base_path"])
    merged = gguf.GGUFReader(str(bundle / "llm-q8_0.gguf"))
    base_keys = {k for k in base.fields if not k.startswith("GGUF.")}
    assert base_keys <= set(merged.fields)
    assert merged.fields["tokenizer.ggml.tokens"].contents() == base.fields["tokenizer.ggml.tokens"].contents()
    assert merged.fields["tokenizer.ggml.merges"].contents() == base.fields["tokenizer.ggml.merges"].contents()
    assert {t.name for t in merged.tensors} == {t.name for t in base.tensors}


def test_llama_cpp_loads_the_bundle_gguf(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    with LlamaScorer(bundle / "llm-q8_0.gguf", manifest["llm"]["yes_token_id"], manifest["llm"]["no_token_id"]) as llm:
        p = llm.score_full([1, *llm.tokenize("Target movie: Movie Number 3\nAnswer:")])
    assert 0.0 < p < 1.0


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def _edit_manifest(bundle: Path, edit) -> None:  # noqa: ANN001
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: (b / "crm.onnx").unlink(), r"crm\.onnx: missing"),
        (
            lambda b: (b / "llm-q8_0.gguf").write_bytes((b / "llm-q8_0.gguf").read_bytes()[:1000]),
            r"llm-q8_0\.gguf: size 1000 bytes, .* \(truncated\?\)",
        ),
        (
            lambda b: (b / "features.json").write_text(
                (b / "features.json").read_text().replace('"history_length": 5', '"history_length": 6')
            ),
            r"features\.json: sha256",
        ),  # fmt: skip
        (lambda b: (b / "manifest.json").write_text("{oops"), r"manifest\.json: not valid JSON"),
        (lambda b: (b / "manifest.json").unlink(), r"manifest\.json: missing"),
        # entries left out of the hashed files: each opened file must be verified, or refused
        (lambda b: _edit_manifest(b, lambda m: m["files"].pop("crm.onnx")), r"crm\.onnx: the runtime opens it"),
        (lambda b: _edit_manifest(b, lambda m: m["files"].pop("llm-q8_0.gguf")), r"llm-q8_0\.gguf: the runtime opens"),
        (lambda b: _edit_manifest(b, lambda m: m["files"].pop("store.sqlite")), r"store\.sqlite: the runtime opens"),
        # names that leave the bundle
        (
            lambda b: _edit_manifest(b, lambda m: m["crm"].update(file="../crm.onnx")),
            r"'\.\./crm\.onnx' is not a plain",
        ),
        (lambda b: _edit_manifest(b, lambda m: m.update(store="/etc/passwd")), r"'/etc/passwd' is not a plain"),
        (
            lambda b: _edit_manifest(b, lambda m: m["files"].update({"../x": {"sha256": "0", "size": 0}})),
            r"'\.\./x' is not a plain",
        ),  # fmt: skip
        (lambda b: _edit_manifest(b, lambda m: m.pop("router")), r"no 'router' entry"),
        (lambda b: _edit_manifest(b, lambda m: m.pop("features")), r"no 'features' entry"),
        (lambda b: _edit_manifest(b, lambda m: m["files"].pop("prompt.json")), r"prompt\.json: the runtime opens"),
        (lambda b: _edit_manifest(b, lambda m: m["files"].update({"crm.onnx": "x"})), r"malformed entry for crm\.onnx"),
        (lambda b: _edit_manifest(b, lambda m: m.update(files=[])), r"malformed manifest \(no file list\)"),
        (lambda b: (b / "prompt.json").write_text("{}"), r"prompt\.json: size"),
        (
            lambda b: (b / "store.sqlite").write_bytes(b"\0" * (b / "store.sqlite").stat().st_size),
            r"store\.sqlite: sha256",
        ),  # fmt: skip
        (lambda b: _edit_manifest(b, lambda m: m["llm"].pop("file")), r"malformed llm entry"),
    ],
)
def test_corrupt_bundles_are_refused_naming_the_file(bundle, tmp_path, damage, message):
    copy = _copy(bundle, tmp_path)
    damage(copy)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_newer_format_is_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer"):
        load_bundle(copy)


def test_an_unusable_device_is_refused_before_any_work(trained_run, tmp_path):
    from training.device import cuda_reason

    device = "cuda" if cuda_reason() is not None else "cuda:99"
    with pytest.raises(ConfigError, match="cuda"):
        export_bundle(trained_run, tmp_path / "b", ExportConfig(device=device))
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())


def test_explicit_tensorrt_without_gpu_fails_with_the_reason(trained_run, tmp_path):
    with pytest.raises(ExportError, match="tensorrt"):
        export_bundle(trained_run, tmp_path / "trt", ExportConfig(tensorrt=True))
    assert not (tmp_path / "trt").exists()
    assert not list(tmp_path.glob(".trt*"))  # nothing half-written left behind


def test_tensorrt_gets_a_batch_profile_and_an_engine_cache_keyed_by_the_model(bundle, tmp_path):
    from runtime.crm import CRMSession, model_digest, tensorrt_options

    crm = load_bundle(bundle).crm_file
    options = tensorrt_options(crm, tmp_path / "trt", (1, 50, 300))
    session = CRMSession(crm, ["cpu"])
    names = [i.name for i in session.session.get_inputs()]
    for key, batch in (("min", 1), ("opt", 50), ("max", 300)):
        shapes = dict(part.split(":") for part in options[f"trt_profile_{key}_shapes"].split(","))
        assert sorted(shapes) == sorted(names)  # every input, each with its batch first
        assert all(shape.split("x")[0] == str(batch) for shape in shapes.values())
    folder = Path(options["trt_engine_cache_path"])
    assert folder == tmp_path / "trt" / model_digest(crm) and folder.is_dir()
    other = tmp_path / "other.onnx"
    other.write_bytes(crm.read_bytes() + b"\0")  # another model never shares the cache folder
    assert model_digest(other) != model_digest(crm)
    # the warm-up runs every profile batch before the server says ready
    warm = CRMSession(crm, ["cpu"], batches=(1, 7, 33)).warm_up()
    assert warm["provider"] == "CPUExecutionProvider" and list(warm["seconds_by_batch"]) == ["1", "7", "33"]


def test_fetch_converter_takes_the_installed_versions_converter_out_of_its_sdist(monkeypatch):
    """Through pip, from the index pip is configured with (~75 MB, ~30 s here, once: kept in the
    user's corella cache, as an export keeps it): the converter, the `conversion` package and the
    gguf-py it needs, matched to the installed llama-cpp-python."""
    import importlib.metadata
    import subprocess
    import sys

    from export.converter import fetch_converter
    from export.crm import ExportError

    from .conftest import USER_HOME

    version = importlib.metadata.version("llama-cpp-python")
    try:
        script = fetch_converter(home=USER_HOME)
    except ExportError as exc:
        if "sdist" in str(exc) and "holds no" not in str(exc):  # no index: nothing to test
            pytest.skip(f"no package index answered for the sdist: {exc}")
        raise
    assert script == USER_HOME / "tools" / f"llama.cpp-{version}" / "convert_hf_to_gguf.py"
    assert (script.parent / "conversion" / "__init__.py").is_file()
    assert (script.parent / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert not list(script.parent.parent.glob("*.partial"))
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "--outtype" in shown.stdout, shown.stderr[-500:]

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert fetch_converter(home=USER_HOME) == script  # kept: the second export does not download


def test_crm_only_run_exports_a_crm_bundle(tmp_path, synthetic_dir):
    from training.crm_trainer import CRMTrainConfig
    from training.runs import DataConfig, run_crm_stage

    run_crm_stage(tmp_path / "crm-run", DataConfig(source=str(synthetic_dir), history_length=5),
                  train_config=CRMTrainConfig(epochs=1), show_progress=False)  # fmt: skip
    manifest = export_bundle(tmp_path / "crm-run", tmp_path / "b")
    assert manifest["llm"] is None and np.isfinite(manifest["metrics"]["crm_test"]["auc"])
    export_bundle(tmp_path / "crm-run", tmp_path / "b")  # re-running replaces it safely
    assert load_bundle(tmp_path / "b").llm is None


def test_export_calibrates_the_shipped_llm_and_the_engine_applies_it(bundle, tmp_path):
    from benchmarks.suites import score_many
    from runtime.engine import CandidateItem, Engine, EngineSettings, Request
    from runtime.router import LLMCalibration

    copy = _copy(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    fitted = manifest["router"]["llm_calibration"]
    assert fitted["samples"] == manifest["llm"]["routed_validation_samples"] > 0
    assert "llm-q8_0.gguf" in fitted["fitted_on"]
    calibration = manifest["llm"]["calibration"]
    assert calibration["routed_logloss_calibrated"] <= calibration["routed_logloss_raw"] + 1e-9
    # a steeper map than the tiny model's, so that a missing or double application shows
    manifest["router"]["llm_calibration"] = {"slope": 3.0, "intercept": 0.5, "samples": 10}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine(load_bundle(copy), EngineSettings(providers=("cpu",), store=tmp_path / "store.sqlite"))
    try:
        # a deadline no busy box misses (the default 2 s fell to the CRM once with training beside the tests)
        request = Request(candidates=[CandidateItem(str(i)) for i in range(1, 7)], user_id="7", mode="llm",
                          deadline_ms=60_000)  # fmt: skip
        answer = engine.predict(request)
        prepared = engine.prepare(request)
        prefix, suffixes = engine.prompt_ids(prepared.history, prepared.items)
        raw = score_many(engine, [(prefix, suffixes)])[0]
    finally:
        engine.close()
    predictions = answer["predictions"]
    assert {p["route"] for p in predictions} == {"llm"}
    assert [p["llm_score"] for p in predictions] == pytest.approx(raw, abs=1e-6)
    assert [p["score"] for p in predictions] == pytest.approx(LLMCalibration(3.0, 0.5).apply(raw), abs=1e-6)


def test_malformed_calibration_is_refused_naming_the_manifest(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["router"]["llm_calibration"] = {"slope": "steep"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: malformed LLM calibration"):
        load_bundle(copy)


def test_quant_auto_keeps_the_smallest_quantization_within_the_bar(trained_run, bundle, tmp_path):
    """The session bundle measured q8_0 and q4_k_m against f16 on the same routed samples; a bar
    between their costs makes auto pass q4_k_m by for q8_0, a bar below both keeps f16."""
    from export.bundle import AUTO_ORDER, _choose_quant

    tried = json.loads((bundle / "manifest.json").read_text())["llm"]["quant_choice"]["tried"]
    assert set(tried) == {"q8_0", "q4_k_m"} and AUTO_ORDER == ("q4_k_m", "q8_0")
    measured: list[str] = []

    def measure(quant: str) -> float:
        measured.append(quant)
        return {"q4_k_m": 0.02, "q8_0": 0.001}[quant]

    choice = _choose_quant(ExportConfig(quant="auto", quant_bar=0.005), measure, 500)
    assert choice["kept"] == "q8_0" and measured == ["q4_k_m", "q8_0"] and "within 0.005" in choice["reason"]
    measured.clear()
    assert _choose_quant(ExportConfig(quant="auto", quant_bar=0.05), measure, 500)["kept"] == "q4_k_m"
    assert measured == ["q4_k_m"]  # the smallest passed: nothing larger is measured
    assert _choose_quant(ExportConfig(quant="auto", quant_bar=-1.0), measure, 500)["kept"] == "f16"
    # end to end on the tiny model: a bar below what both quantizations cost ships f16, after measuring both
    out = tmp_path / "auto"
    config = ExportConfig(quant="auto", quant_bar=min(tried.values()) - 0.01, parity_prompts=16, routed_samples=20,
                          eval_samples=10)  # fmt: skip
    manifest = export_bundle(trained_run, out, config)
    assert set(manifest["llm"]["quant_choice"]["tried"]) == {"q4_k_m", "q8_0"}
    expected = "f16"
    assert manifest["llm"]["quant"] == expected and (out / f"llm-{expected}.gguf").exists()
    assert manifest["llm"]["quant_choice"]["rule"] == "auto" and manifest["llm"]["quant_choice"]["kept"] == expected
    assert load_bundle(out).manifest["llm"]["file"] == f"llm-{expected}.gguf"


def test_a_run_whose_llm_reads_a_crm_token_is_refused_naming_the_file(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    info = run / "final" / "llm" / "llm.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"crm_token": True}))
    with pytest.raises(ExportError, match="CRM token") as refused:
        export_bundle(run, tmp_path / "bundle")
    assert str(info) in str(refused.value) and not (tmp_path / "bundle").exists()
