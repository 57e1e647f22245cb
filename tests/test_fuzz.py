"""The served OpenAPI, fuzzed by schemathesis (examples, coverage and fuzzing phases, every check)
against a real `corella serve` on loopback: no server error, no schema-violating request accepted,
every response documented, every 4xx in the envelope."""

import os
import re
import shutil
import subprocess
import sys

from .test_server import _free_port, _start_server

MAX_EXAMPLES = int(os.environ.get("CORELLA_FUZZ_EXAMPLES", "700"))


def test_schemathesis_finds_nothing(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    port = _free_port()
    # with an admin key, and schemathesis sending it: /v1/admin/reload is fuzzed for real (random
    # folders: a clear 422 each, the bundle served on), not only refused
    (tmp_path / "admin.key").write_text("fuzz-admin")
    server = _start_server(copy, port, "--llm-threads", "1", "--state", str(tmp_path / "state"),
                           "--admin-api-key-file", str(tmp_path / "admin.key"))  # fmt: skip
    report = tmp_path / "report"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"http://127.0.0.1:{port}/openapi.json",
             "--phases", "examples,coverage,fuzzing", "--checks", "all", "-n", str(MAX_EXAMPLES), "--seed", "7",
             "-H", "Authorization: Bearer fuzz-admin", "--report", "ndjson", "--report-dir", str(report)],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,  # its caches stay out of the checkout
        )  # fmt: skip
    finally:
        server.kill()
        server.wait()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated, output[-3000:]
    print(f"schemathesis: {generated.group(0)}")
    # every endpoint, 1,500 cases or more in all (with the default CORELLA_FUZZ_EXAMPLES; ~1,700 since
    # the Authorization header is in the schema only when the server has a key, ~2,100 before)
    assert re.search(r"(?<![\d,])8 passed\b", output), output[-3000:]  # all eight operations, not "18 passed"
    assert int(generated.group(1)) >= (1500 if MAX_EXAMPLES >= 700 else 1)
