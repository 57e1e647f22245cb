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

    from runtime.server import ServerSettings

    monkeypatch.setenv("CORELLA_DEFAULT_DEADLINE_MS", "750")
    monkeypatch.setenv("CORELLA_LOAD_LLM", "false")
    settings = ServerSettings.from_options(tmp_path, port=9001, default_deadline_ms=None, load_llm=None,
                                           llm_queue_candidates=9)  # fmt: skip
    assert (settings.port, settings.default_deadline_ms, settings.load_llm) == (9001, 750.0, False)
    assert settings.llm_queue_candidates == 9
    # uvicorn's access log: off unless asked for, by option or variable
    from runtime.server import create_app, uvicorn_config

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
