"""The peers corella is measured against, at their best: llama.cpp's own `llama-server` and
llama-cpp-python's server, each scoring a candidate with a one-token completion and reading
P(Yes) against P(No).

`llama_server()` builds the `llama-server` target with CMake from the vendored llama.cpp of the
installed llama-cpp-python (its sdist, runtime/sdist.py), statically linked, and keeps the binary
in $CORELLA_HOME/tools/llama-server-<version>/ with how long the build took: a later run reuses it.

    python -m benchmarks.peers build        # build (or find) llama-server; print where and how long
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import CorellaError
from runtime.paths import corella_home
from runtime.sdist import SdistError, installed_llama_cpp_version, llama_cpp_sdist

__all__ = ["PeerUnavailable", "llama_server", "build_tools_missing", "server_command", "completion_body",
           "yes_probability_from", "PEERS", "PeerWork", "peer_work", "peer_comparison"]  # fmt: skip

PEERS = ("llama-server", "llama-cpp-python")
_CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON",
                "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF")  # fmt: skip


class PeerUnavailable(CorellaError):
    """A peer that cannot run here (no build tools, no sdist, a failed build): the reason says which."""


def build_tools_missing() -> str | None:
    """What a build of llama-server lacks here, or None."""
    missing = [tool for tool in ("cmake", "c++", "cc") if shutil.which(tool) is None]
    return f"no {', '.join(missing)} on PATH (apt install cmake g++)" if missing else None


def _tool_folder(version: str, home: Path | None) -> Path:
    return (home or corella_home()) / "tools" / f"llama-server-{version}"


def llama_server(home: Path | None = None, jobs: int | None = None, log: Any = None,
                 progress: Any = None) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """The llama-server binary matched to the installed llama-cpp-python, built once; and its
    build record (seconds, version, flags)."""
    version = installed_llama_cpp_version()
    folder = _tool_folder(version, home)
    binary, record = folder / "llama-server", folder / "build.json"
    if binary.is_file() and record.is_file():
        return binary, json.loads(record.read_text())
    missing = build_tools_missing()
    if missing:
        raise PeerUnavailable(f"cannot build llama-server: {missing}")
    if progress is not None:
        progress(f"building llama-server {version} from its sdist (once; ~15 minutes on 2 cores)")
    started = time.perf_counter()
    sdist = llama_cpp_sdist(version, home)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    source = staging / "src"
    source.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for member in tar:
            inner = member.name.split("/", 1)[-1]
            if inner.startswith("vendor/llama.cpp/") and (member.isfile() or member.isdir()):
                member.name = inner.removeprefix("vendor/llama.cpp/")
                tar.extract(member, source, filter="data")
    build = staging / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = jobs or os.cpu_count() or 2
    steps = [["cmake", "-S", str(source), "-B", str(build), *generator, *_CMAKE_FLAGS],
             ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]]  # fmt: skip
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if log is not None:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise PeerUnavailable(f"building llama-server failed at `{' '.join(step[:3])}`: {' | '.join(tail)}")
    built = next(iter(sorted(build.rglob("llama-server"))), None)
    if built is None or not built.is_file():
        raise PeerUnavailable(f"the llama-server build left no binary under {build}")
    record_data = {"version": version, "seconds": round(time.perf_counter() - started, 1), "jobs": jobs,
                   "flags": list(_CMAKE_FLAGS),
                   "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    shutil.copy2(built, staging / "llama-server")
    (staging / "build.json").write_text(json.dumps(record_data, indent=1))
    shutil.rmtree(source)
    shutil.rmtree(build)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return binary, record_data


def server_command(binary: Path, gguf: Path, port: int, threads: int, slots: int, context_per_slot: int = 1024,
                   swa_full: bool = True) -> list[str]:  # fmt: skip
    """llama-server at its best for this work: a slot a client, each slot's prompt cached, the whole
    sliding-window cache kept (Gemma 3: without it every prompt is decoded again)."""
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
               "-tb", str(threads), "--parallel", str(slots), "-c", str(context_per_slot * slots),
               "--cache-prompt", "--no-webui", "-b", "2048"]  # fmt: skip
    return command + (["--swa-full"] if swa_full else [])


def completion_body(tokens: Sequence[int], slot: int | None, answer: int, probabilities: int = 20) -> dict[str, Any]:
    """One candidate as llama-server's /completion takes it: the prompt as token ids (exactly the
    tokens corella decodes), one token generated, the top `probabilities` of its distribution.

    The generated token is forced to `answer` (the bundle's yes token): llama-server withholds the
    probabilities of a token that ends in half a UTF-8 character (a byte token, say), and its
    sampler draws at random unless told otherwise. The probabilities it reports are the model's
    own (post_sampling_probs off), before the bias."""
    body: dict[str, Any] = {"prompt": list(tokens), "n_predict": 1, "n_probs": probabilities, "cache_prompt": True,
                            "samplers": ["top_k"], "top_k": 1, "logit_bias": [[int(answer), 100.0]],
                            "post_sampling_probs": False}  # fmt: skip
    if slot is not None:
        body["id_slot"] = slot
    return body


def yes_probability_from(answer: dict[str, Any], yes: str = " Yes", no: str = " No") -> float | None:
    """P(Yes) / (P(Yes) + P(No)) from a /completion answer's top probabilities; None where neither
    answer is among them."""
    entries = answer.get("completion_probabilities") or []
    if not entries:
        return None
    top = entries[0].get("top_logprobs") or entries[0].get("probs") or []
    found: dict[str, float] = {}
    for entry in top:
        text = entry.get("token", entry.get("tok_str"))
        if "logprob" in entry:
            found[text] = math.exp(float(entry["logprob"]))
        elif "prob" in entry:
            found[text] = float(entry["prob"])
    p_yes, p_no = found.get(yes, 0.0), found.get(no, 0.0)
    if p_yes + p_no == 0.0:
        return None
    return p_yes / (p_yes + p_no)


# ---------------------------------------------------------------------------- the comparison
@dataclass
class PeerWork:
    """The same work for every server: each user's candidates, as corella's requests and as the
    token ids (whole vocabulary) and texts of each candidate's prompt."""

    bodies: list[dict[str, Any]]  # corella: one mode "llm" request a user
    ids: list[list[int]]  # the peers: one prompt a candidate, users one after another
    texts: list[str]
    groups: list[list[int]]  # a user's prompts, sent by one client in order
    answer: int  # the yes token, the one a peer is made to generate

    @property
    def candidates(self) -> int:
        return len(self.ids)


def peer_work(engine: Any, bundle: Any, users: Sequence[str], candidates: int, seed: int) -> PeerWork:
    from runtime.engine import CandidateItem, Request

    items = engine.store.item_ids()
    rng = np.random.default_rng(seed)
    bos = bundle.llm.get("bos_token_id")
    bodies, ids, texts, groups = [], [], [], []
    for user in users:
        chosen = [items[i] for i in rng.choice(len(items), size=candidates, replace=False)]
        bodies.append({"user_id": user, "candidates": [{"item_id": i} for i in chosen], "mode": "llm",
                       "deadline_ms": 600_000})  # fmt: skip
        prepared = engine.prepare(Request([CandidateItem(i) for i in chosen], user_id=user, mode="llm"))
        prefix, suffixes = engine.prompt_texts(prepared.history, prepared.items)
        head = ([bos] if bos is not None else []) + engine.llm.tokenize(prefix)
        groups.append(list(range(len(ids), len(ids) + len(suffixes))))
        ids += [head + engine.llm.tokenize(suffix) for suffix in suffixes]
        texts += [prefix + suffix for suffix in suffixes]
    return PeerWork(bodies, ids, texts, groups, int(bundle.llm["yes_token_id"]))


def _rate(name: str, answers: list[tuple[int, float, Any]], wall: float, **extra: Any) -> dict[str, Any]:
    done = sum(status == 200 for status, _, _ in answers)
    return {"server": name, "candidates": done, "seconds": round(wall, 2), "per_second": done / wall,
            "errors": len(answers) - done, **extra}  # fmt: skip


def _corella_rate(name: str, bundle: Any, work: PeerWork, warm: dict[str, Any], out: Path, config: Any,
                  **options: Any) -> dict[str, Any]:  # fmt: skip
    from benchmarks.load import corella_serve_command, free_port, scrape, send_all, server_process

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = corella_serve_command(bundle.path, port, out / f"peer-{name}-state", llm_threads=config.threads,
                                    **options)  # fmt: skip
    with server_process(command, f"{base}/readyz", out / f"peer-{name}.log"):
        send_all(base, "/v1/predict", [warm], 1)  # warm: a user outside the measured ones
        before = scrape(base).get("corella_llm_batch_tokens_sum", 0.0)
        answers, wall = send_all(base, "/v1/predict", work.bodies, config.peer_concurrency)
        tokens = scrape(base).get("corella_llm_batch_tokens_sum", 0.0) - before
    scored = sum(sum(p["route"] == "llm" for p in a["predictions"]) for status, _, a in answers if status == 200)
    return {"server": name, "candidates": scored, "seconds": round(wall, 2), "per_second": scored / wall,
            "errors": sum(status != 200 for status, _, _ in answers), "tokens_decoded": int(tokens),
            "tokens_per_candidate": tokens / max(scored, 1)}  # fmt: skip


def _llama_server_rate(binary: Path, bundle: Any, work: PeerWork, warm_ids: list[int], out: Path, config: Any,
                       threads: int) -> dict[str, Any]:  # fmt: skip
    from benchmarks.load import free_port, send_all, server_process

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    slots = config.peer_concurrency
    command = server_command(binary, bundle.llm_file, port, threads, slots)
    with server_process(command, f"{base}/health", out / "peer-llama-server.log"):
        send_all(base, "/completion", [completion_body(warm_ids, 0, work.answer)], 1)
        bodies = [completion_body(ids, None, work.answer) for ids in work.ids]
        answers, wall = send_all(base, "/completion", bodies, config.peer_concurrency, sequences=work.groups,
                                 client_field="id_slot")  # fmt: skip
    tokens = sum(int((a or {}).get("timings", {}).get("prompt_n", 0)) for status, _, a in answers if status == 200)
    read = [yes_probability_from(a) for status, _, a in answers if status == 200]
    return _rate("llama-server", answers, wall, slots=slots, tokens_decoded=tokens,
                 tokens_per_candidate=tokens / max(len(read), 1),
                 answers_read=sum(p is not None for p in read))  # fmt: skip


def _llama_cpp_python_rate(bundle: Any, work: PeerWork, out: Path, config: Any, threads: int,
                           concurrency: int) -> dict[str, Any]:  # fmt: skip
    from benchmarks.load import free_port, send_all, server_process

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(bundle.llm_file), "--host", "127.0.0.1",
               "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
               "--logits_all", "False"]  # fmt: skip
    with server_process(command, f"{base}/v1/models", out / f"peer-llama-cpp-python-{concurrency}.log"):
        send_all(base, "/v1/completions", [{"prompt": work.texts[0][:200], "max_tokens": 1}], 1)
        # its API takes text only: it tokenizes prefix + suffix as one text (the same tokens but, at
        # times, the one where prefix and suffix meet)
        bodies = [{"prompt": text, "max_tokens": 1, "temperature": 0.0} for text in work.texts]
        answers, wall = send_all(base, "/v1/completions", bodies, concurrency, sequences=work.groups)
    return _rate("llama-cpp-python", answers, wall, clients=concurrency)


def _alone_rate(name: str, gguf: Path, work: PeerWork, warm: PeerWork, yes: int, no: int, threads: int,
                mapped: Callable[[Sequence[int]], Sequence[int]] = tuple) -> dict[str, Any]:  # fmt: skip
    """llama.cpp in this process, no server, decoding the fewest tokens: what every prompt shares
    (the instruction) once before the clock starts, then for each user, one after another, the rest
    of its prefix and its candidates' suffixes in one batch. The most a server of this GGUF on these
    threads could reach on the same prompts, short of batching users together."""
    from runtime.llm import LlamaContext, LlamaModel

    def prompts(of: PeerWork) -> list[list[list[int]]]:
        return [[list(mapped(of.ids[i])) for i in group] for group in of.groups]

    measured, warmed = prompts(work), prompts(warm)
    everyone = [p for group in measured + warmed for p in group]
    head = len(os.path.commonprefix(everyone)) - 1  # every prompt keeps a token of its own
    model = LlamaModel(gguf, yes, no)
    context = LlamaContext(model, 4096, 1024, max(map(len, work.groups + warm.groups)) + 2, threads)

    def users(groups: list[list[list[int]]]) -> tuple[int, int]:
        done = tokens = 0
        for group in groups:
            shared = min(len(os.path.commonprefix(group)), min(map(len, group)) - 1)
            context.copy_sequence(0, 1)
            context.prefill(group[0][head:shared], 1, start=head)
            ids, positions, seqs, flags, rows = [], [], [], [], []
            for k, prompt in enumerate(group, start=2):
                context.copy_sequence(1, k)
                ids += prompt[shared:]
                positions += range(shared, len(prompt))
                seqs += [k] * (len(prompt) - shared)
                flags += [False] * (len(prompt) - shared - 1) + [True]
                rows.append(len(ids) - 1)
            context.decode(ids, positions, seqs, flags)
            done += sum(math.isfinite(context.answer(row)) for row in rows)
            tokens += shared - head + len(ids)
            for k in range(1, len(group) + 2):
                context.remove_sequence(k)
        return done, tokens

    try:
        context.prefill(everyone[0][:head], 0)
        users(warmed)
        start = time.perf_counter()
        done, tokens = users(measured)
        wall = time.perf_counter() - start
    finally:
        context.close()
        model.close()
    return {"server": name, "clients": 1, "candidates": done, "seconds": round(wall, 2), "per_second": done / wall,
            "errors": work.candidates - done, "tokens_decoded": tokens,
            "tokens_per_candidate": tokens / max(done, 1)}  # fmt: skip


def _servers(bundle: Any, engine: Any, work: PeerWork, warm: PeerWork, out: Path, config: Any, threads: int,
             result: dict[str, Any], progress: Any) -> list[Callable[[], dict[str, Any]]]:  # fmt: skip
    """Each server's measurement, ready to run (a fresh process each time: its users are cold), and
    llama.cpp alone on the bundle's GGUF and on the copy corella decodes."""
    import importlib.util

    from runtime.vocab import widenable

    runs: list[Callable[[], dict[str, Any]]] = []
    corellas: list[tuple[str, dict[str, Any]]] = [("corella", {}), ("corella --llm-vocab 0", {"llm_vocab": 0})]
    if widenable(bundle.llm_file):
        corellas.append(("corella --no-llm-widen", {"llm_widen": False}))
    for name, options in corellas:
        runs.append(lambda name=name, options=options: _corella_rate(
            name.replace(" ", "_"), bundle, work, warm.bodies[0], out, config, **options)
            | {"server": name, "clients": config.peer_concurrency})  # fmt: skip
    yes, no = int(bundle.llm["yes_token_id"]), int(bundle.llm["no_token_id"])
    runs.append(lambda: _alone_rate("llama.cpp alone", bundle.llm_file, work, warm, yes, no, threads))
    copy, cut = engine.served.copy_file, engine.vocab_cut
    if copy is not None:
        mapped_yes, mapped_no = (cut.id(yes), cut.id(no)) if cut is not None else (yes, no)
        runs.append(lambda: _alone_rate("llama.cpp alone, corella's copy", copy, work, warm, mapped_yes, mapped_no,
                                        threads, cut.ids if cut is not None else tuple))  # fmt: skip
    if "llama-server" in config.peers:
        try:
            binary, build = llama_server(progress=progress)
            result["llama_server_build"] = build
            runs.append(lambda: _llama_server_rate(binary, bundle, work, warm.ids[0], out, config, threads)
                        | {"clients": config.peer_concurrency})  # fmt: skip
        except (PeerUnavailable, SdistError) as exc:
            result["llama_server_skipped"] = str(exc)
            progress(f"peer: llama-server skipped: {exc}")
    if "llama-cpp-python" in config.peers:
        if importlib.util.find_spec("llama_cpp.server") is None or importlib.util.find_spec("sse_starlette") is None:
            result["llama_cpp_python_skipped"] = (
                "llama_cpp.server does not import here (pip install 'llama-cpp-python[server]')"
            )
        else:
            for clients in dict.fromkeys((1, config.peer_concurrency)):
                runs.append(lambda clients=clients: _llama_cpp_python_rate(bundle, work, out, config, threads, clients))
    return runs


def peer_comparison(bundle: Any, engine: Any, users: Sequence[str], warm_user: str, out: Path, config: Any,
                    progress: Any) -> dict[str, Any]:  # fmt: skip
    """Routed candidates scored a second, the same users and candidates on every server, each
    warmed first, the bundle's whole GGUF and the same threads everywhere: corella (cut vocabulary
    and whole), llama-server (a slot a client, prompt cache, --swa-full) and llama-cpp-python's
    server (at 1 client, its best, and at the same concurrency). The servers take turns for
    `config.peer_rounds` rounds, each time a fresh process; a row is a server's median round (a
    shared box drifts by 10-20% from minute to minute: turns spread the drift over every server)."""
    threads = int(config.threads or engine.scheduler.settings.threads)
    work = peer_work(engine, bundle, users, config.peer_candidates, config.seed + 4)
    warm = peer_work(engine, bundle, [warm_user], 2, config.seed + 5)
    result: dict[str, Any] = {"users": len(users), "candidates": work.candidates, "threads": threads,
                              "concurrency": config.peer_concurrency, "gguf": bundle.llm_file.name,
                              "rounds": config.peer_rounds, "rows": []}  # fmt: skip
    runs = _servers(bundle, engine, work, warm, out, config, threads, result, progress)
    measured: list[list[dict[str, Any]]] = [[] for _ in runs]
    for round_ in range(config.peer_rounds):
        for taken, run in zip(measured, runs, strict=True):
            taken.append(run())
            row = taken[-1]
            tokens = f" ({row['tokens_per_candidate']:.1f} tokens a candidate)" if "tokens_per_candidate" in row else ""
            progress(f"peer round {round_ + 1}: {row['server']}, {row['clients']} client(s) "
                     f"{row['per_second']:.2f} candidates/s{tokens}")  # fmt: skip
    for taken in measured:
        ordered = sorted(taken, key=lambda r: r["per_second"])
        result["rows"].append(ordered[(len(ordered) - 1) // 2] | {"rounds": [round(r["per_second"], 2) for r in taken]})
    rows = result["rows"]
    ours = rows[0]["per_second"]
    for row in rows:
        row["corella_over_this"] = ours / row["per_second"] if row["per_second"] else float("nan")
    return result


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] != ["build"]:
        raise SystemExit(__doc__)
    binary, record = llama_server(log=sys.stderr)
    print(f"{binary} (llama-cpp-python {record['version']}, built in {record['seconds']} s)")


if __name__ == "__main__":
    main()
