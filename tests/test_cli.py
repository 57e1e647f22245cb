"""The CLI end to end through typer's runner: real commands, real files."""

import json

from typer.testing import CliRunner

from corella_cli.main import app

runner = CliRunner(env={"COLUMNS": "200"})


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    import typer

    listed = set(typer.main.get_command(app).commands)
    # every command the README names, and no private helper exposed as a command
    assert {"data", "train", "export", "serve", "predict", "bench", "store", "doctor", "quickstart"} <= listed
    assert not [name for name in listed if name.startswith(("-", "_"))]
    for command in ("quickstart", "doctor"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0


def test_doctor_says_what_this_box_offers_and_loads_the_bundle(bundle, tmp_path):
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.output)}
    assert {"machine", "NVIDIA driver", "torch (training)", "llama.cpp", "onnxruntime"} <= set(checks)
    assert checks["llama.cpp"]["status"] == "ok" and checks["onnxruntime"]["status"] == "ok"
    assert all(c["status"] in {"ok", "warn", "n/a"} for c in checks.values())
    with_bundle = runner.invoke(app, ["doctor", str(bundle), "--json"])
    assert with_bundle.exit_code == 0, with_bundle.output
    checks = {c["name"]: c for c in json.loads(with_bundle.output)}
    assert checks["CRM on cpu"]["status"] == "ok" and "batch 1024" in checks["CRM on cpu"]["detail"]
    assert checks["LLM of the bundle"]["status"] == "ok" and "P(yes)" in checks["LLM of the bundle"]["detail"]
    # a damaged bundle is a failure with the file named, exit 1; not a bundle at all is a usage error
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    gguf = next(damaged.glob("*.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:1000])
    failed = runner.invoke(app, ["doctor", str(damaged)])
    assert failed.exit_code == 1 and gguf.name in failed.output and "Traceback" not in failed.output
    assert runner.invoke(app, ["doctor", str(tmp_path)]).exit_code == 2


def test_data_fetch_and_info_from_shared_copy(ml100k_dir, corella_home):
    result = runner.invoke(app, ["data", "fetch", "movielens-100k", "--from", str(ml100k_dir)])
    assert result.exit_code == 0, result.output
    assert "100,000 interactions" in result.output
    assert (corella_home / "data" / "movielens-100k" / "ml-100k.inter").exists()
    info = runner.invoke(app, ["data", "info", "movielens-100k"])
    assert info.exit_code == 0, info.output
    assert "80,000" in info.output and "0.8582" in info.output


def test_user_mistakes_are_clear_errors_not_tracebacks(tmp_path):
    result = runner.invoke(app, ["data", "fetch", "no-such-set"])
    assert result.exit_code == 2
    assert "unknown data set 'no-such-set'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", "crm", "--dataset", "movielens-1m", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "corella data fetch movielens-1m" in result.output
    result = runner.invoke(app, ["train", "crm", "--embedding-dim", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "embedding_dim" in result.output


def test_train_crm_command_writes_metrics(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "crm",
        "--from",
        str(synthetic_dir),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--history-length",
        "5",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "crm" / "metrics.json").read_text())
    assert metrics["fit"]["epochs_run"] == 2
    assert "by CRM entropy decile" in result.output


def test_a_run_that_breaks_mid_training_says_one_line_and_resumes(synthetic_dir, tmp_path, monkeypatch):
    import training.crm_trainer as trainer

    out = tmp_path / "run"
    args = ["train", "crm", "--from", str(synthetic_dir), "--out", str(out), "--epochs", "3", "--batch-size", "64",
            "--history-length", "5", "--patience", "5"]  # fmt: skip
    real_auc, calls = trainer.auc, []

    def breaks_in_epoch_2(labels, scores):  # noqa: ANN001, ANN202 - what a data hole would do in the loop
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("sequence item 0: expected str instance, float found")
        return real_auc(labels, scores)

    monkeypatch.setattr(trainer, "auc", breaks_in_epoch_2)
    result = runner.invoke(app, args)
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: the run stopped (TypeError: sequence item 0" in said and f"--resume --out {out}" in said
    monkeypatch.setattr(trainer, "auc", real_auc)
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "crm" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]  # epoch 1 was kept, not trained again


def test_serve_reads_corella_variables_and_options_override_them(tmp_path, monkeypatch):
    # an invalid value in the environment is refused: the variable is read, not hidden by a default
    monkeypatch.setenv("CORELLA_LLM_QUEUE_CANDIDATES", "0")
    result = runner.invoke(app, ["serve", str(tmp_path)])
    assert (
        result.exit_code == 2 and "CORELLA_LLM_QUEUE_CANDIDATES" in result.output and "Traceback" not in result.output
    )
    # the option wins over the variable; the next check is the bundle, named in the error
    result = runner.invoke(app, ["serve", str(tmp_path), "--llm-queue-candidates", "5"])
    assert result.exit_code == 2 and "manifest.json: missing" in result.output

    from runtime.serving import ServerSettings

    monkeypatch.setenv("CORELLA_DEFAULT_DEADLINE_MS", "750")
    monkeypatch.setenv("CORELLA_LOAD_LLM", "false")
    settings = ServerSettings.from_options(tmp_path, port=9001, default_deadline_ms=None, load_llm=None,
                                           llm_queue_candidates=9)  # fmt: skip
    assert (settings.port, settings.default_deadline_ms, settings.load_llm) == (9001, 750.0, False)
    assert settings.llm_queue_candidates == 9
    # uvicorn's access log: off unless asked for, by option or variable
    from runtime.serving import create_app, uvicorn_config

    monkeypatch.delenv("CORELLA_LLM_QUEUE_CANDIDATES")
    quiet = ServerSettings(bundle=tmp_path)
    assert not quiet.access_log and not uvicorn_config(create_app(quiet), quiet).access_log
    monkeypatch.setenv("CORELLA_ACCESS_LOG", "1")
    assert ServerSettings.from_options(tmp_path, access_log=None).access_log
    assert not ServerSettings.from_options(tmp_path, access_log=False).access_log


def test_train_options_reach_the_run_config(synthetic_dir, tmp_path):
    from .tiny_llm import write_tiny_llama_gguf

    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "run"
    args = ["train", "--from", str(synthetic_dir), "--llm", str(gguf), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", "--stage2-samples", "8", "--stage3-samples", "4", "--batch-size", "4",
            "--grad-accumulation", "2", "--gradient-checkpointing", "--no-stage3", "--lora-rank", "4",
            "--eval-samples", "30", "--calibration-samples", "10", "--max-prompt-tokens", "400",
            "--seed", "5"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "run.json").read_text())
    config, joint = saved["config"], saved["config"]["joint"]
    assert saved["compute"] == {"device": "cpu", "llm_dtype": "float32"}
    assert (config["source"], config["llm"], config["eval_samples"]) == (str(synthetic_dir), str(gguf), 30)
    assert (config["calibration_samples"], config["max_prompt_tokens"], config["lora"]["rank"]) == (10, 400, 4)
    assert config["lora"]["alpha"] == 8.0 and config["router_fraction"] == 0.1  # not given: the preset's
    assert (joint["stage2_samples"], joint["stage3_samples"], joint["batch_size"], joint["seed"]) == (8, 4, 4, 5)
    assert joint["grad_accumulation"] == 2 and joint["gradient_checkpointing"] and joint["skip_stage3"]
    assert not joint["llm_alone"] and not (out / "stage3").exists()


def test_resume_refuses_options_that_differ_from_the_run(tmp_path):
    import json

    from training.pipeline import preset_config

    run = tmp_path / "run"
    run.mkdir()
    recorded = preset_config("quick", {"joint": {"stage2_samples": 64}})
    (run / "run.json").write_text(json.dumps({"config": recorded.model_dump()}), encoding="utf-8")
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--stage2-samples", "128", "--seed", "3"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "stage2_samples 64 there, 128 given" in " ".join(result.output.split())
    assert "seed" in result.output

    from training.pipeline import resumed_config

    same = resumed_config(run, preset_config("default"), {"joint": {"stage2_samples": 64}, "threads": 1})
    assert same.joint.stage2_samples == 64 and same.threads == 1  # the run's own, and where it runs
    assert resumed_config(run, preset_config("default"), None).joint == recorded.joint


def test_predict_answers_each_line_and_a_bad_line_gets_an_error_line(bundle, tmp_path):
    import json

    lines = [
        json.dumps({"user_id": "3", "candidates": [{"item_id": "1"}, {"item_id": "2"}], "mode": "crm"}),
        '{"user_id": "3", "candidates": [',  # not JSON
        "",
        json.dumps({"user_id": "4", "candidates": []}),  # no candidate
        json.dumps({"user_id": "5", "candidates": [{"item_id": "7"}], "mode": "crm"}),
    ]
    requests, out = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = runner.invoke(app, ["predict", str(bundle), str(requests), "--output", str(out), "--no-llm"])
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [a.get("line") for a in answers] == [None, 2, 4, None]
    assert [len(a["predictions"]) for a in (answers[0], answers[3])] == [2, 1]
    assert answers[1]["error"] and answers[2]["error"] and "Traceback" not in result.output
    assert "2 answers, 2 errors" in " ".join(result.output.split())
    missing = runner.invoke(app, ["predict", str(bundle), str(tmp_path / "none.jsonl")])
    assert missing.exit_code != 0 and "none.jsonl" in missing.output and "Traceback" not in missing.output


def test_bench_options_are_checked_before_any_work(bundle, tmp_path):
    for options, said in ((["--http-levels", "1,x"], "--http-levels takes client counts"),
                          (["--suites", "crm,nope"], "nope")):  # fmt: skip
        result = runner.invoke(app, ["bench", str(bundle), "--out", str(tmp_path / "b"), *options])
        assert result.exit_code != 0 and said in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "b" / "results.json").exists()


def test_store_reset_sets_the_live_store_aside(bundle, tmp_path):
    state = tmp_path / "state"
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.state import live_store

    live = live_store(load_bundle(bundle), state)
    result = runner.invoke(app, ["store", "reset", str(bundle), "--state", str(state)])
    assert result.exit_code == 0, result.output
    assert "set_aside" in result.output and not live.exists()
    aside = [p for p in state.iterdir() if p.name.startswith("store.sqlite.") and p.is_file()]
    assert aside, sorted(p.name for p in state.iterdir())
    wrong = runner.invoke(app, ["store", "reset", str(tmp_path / "nobundle")])
    assert wrong.exit_code != 0 and "not a bundle" in wrong.output and "Traceback" not in wrong.output


def test_export_from_the_command_line_writes_a_bundle_that_loads(trained_run, tmp_path, caplog):
    import json
    import logging

    caplog.set_level(logging.INFO, logger="export")

    from runtime.artifacts.bundle import load_bundle

    out = tmp_path / "bundle"
    result = runner.invoke(app, ["export", str(trained_run), "--out", str(out), "--quant", "q8_0",
                                 "--routed-samples", "20", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = load_bundle(out)  # every file hashed and checked against the manifest
    assert loaded.llm["quant"] == "q8_0" and (out / "crm.onnx").is_file()
    said = " ".join(result.output.split())
    assert "llm-q8_0.gguf" in said and "timings:" in said
    assert said.count("quantization: q8_0") == 1  # each step's message printed once, not logged as well
    assert not [r for r in caplog.records if "quantization: q8_0" in r.getMessage()]
    assert "slope" in json.dumps(loaded.router["llm_calibration"])
    again = runner.invoke(app, ["export", str(tmp_path / "no-run"), "--out", str(tmp_path / "b2")])
    assert again.exit_code != 0 and "no-run" in again.output and "Traceback" not in again.output


def test_quickstarts_sample_answer_is_a_table_with_titles(bundle, tmp_path):
    import io

    from rich.console import Console

    from corella_cli.main import _answer_table
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.store import FeatureStore
    from runtime.engine import CandidateItem, Engine, EngineSettings, Request

    engine = Engine(load_bundle(bundle), EngineSettings(providers=("cpu",), load_llm=False, state=tmp_path / "s"))
    try:
        answer = engine.predict(Request([CandidateItem(str(i)) for i in range(1, 21)], user_id="3", llm_fraction=1.0))
    finally:
        engine.close()
    shown = io.StringIO()
    Console(file=shown, width=200).print(_answer_table(answer, bundle, top=5))
    text = shown.getvalue()
    best = sorted(answer["predictions"], key=lambda p: -p["score"])[:5]
    store = FeatureStore(bundle / "store.sqlite", readonly=True)
    titles = [store.items([p["item_id"]])[p["item_id"]].title for p in best]
    store.close()
    assert all(title in text for title in titles) and "{" not in text  # titles, not raw JSON
    assert text.index(titles[0]) < text.index(titles[-1]) and "crm_fallback (llm_" in text  # route and reason
