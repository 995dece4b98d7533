"""Schema fuzzing: schemathesis against the server's own /openapi.json, every operation,
with a valid key and without one.

Pass: no 5xx, every status, content type, header and body (each SSE event included) matches
what the document declares, invalid bodies are refused with a 4xx, no route answers without
the key, and afterwards the server is idle (no request running, every KV block free), answers
/health 200 and logged no traceback.

The CI run is small and reproducible (fixed seed); `make fuzz` runs more examples, the
boundary-value ("coverage") phase and a fresh seed:
    ATTNSERVE_FUZZ_EXAMPLES=300 ATTNSERVE_FUZZ_PHASES=examples,coverage,fuzzing \\
        ATTNSERVE_FUZZ_SEED=$RANDOM pytest tests/test_reliability_fuzz.py -s
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_helpers import API_KEY, EMBEDDING_MODEL, TINY_ARGS, ServerProcess, tiny_classifier

EXAMPLES = int(os.environ.get("ATTNSERVE_FUZZ_EXAMPLES", "25"))
PHASES = os.environ.get("ATTNSERVE_FUZZ_PHASES", "examples,fuzzing")
SEED = os.environ.get("ATTNSERVE_FUZZ_SEED", "20240")
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
          "ignored_auth"]
# A body over --max-body-bytes is refused with the 413 the document declares; schemathesis's
# default list of rejections lacks it.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
"""


@pytest.fixture(scope="module")
def server(request, tiny_llama):
    # A short max_model_len keeps every generated request (and so the run) short.
    server = ServerProcess(["--model", str(tiny_llama), *TINY_ARGS, "--max-model-len", "32",
                            "--embedding-model", EMBEDDING_MODEL, "--classifier-model", tiny_classifier(request)],
                           api_key=API_KEY).start()
    yield server
    assert server.stop() == 0


def schemathesis_cli() -> str:
    """The CLI beside this interpreter (make test runs .venv/bin/python without activating the venv)."""
    beside = Path(sys.executable).with_name("schemathesis")
    return str(beside) if beside.exists() else shutil.which("schemathesis") or "schemathesis"


def schemathesis(server: ServerProcess, tmp_path: Path, *, with_key: bool) -> tuple[int, str]:
    """Run the CLI; (number of generated cases, its output). Fails the test on any failure."""
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    spec = tmp_path / "openapi.json"      # fetched with the key: the document itself is protected
    spec.write_text(json.dumps(server.get("/openapi.json").json()))
    command = [schemathesis_cli(), "--config-file", str(tmp_path / "schemathesis.toml"),
               "run", str(spec), "--url", server.url, "--checks", ",".join(CHECKS),
               "--max-examples", str(EXAMPLES), "--phases", PHASES, "--seed", SEED, "--workers", "1",
               "--request-timeout", "60", "--suppress-health-check", "all", "--generation-database", "none",
               "--output-truncate", "true", "--no-color"]
    if with_key:
        command += ["--header", f"Authorization: Bearer {API_KEY}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated, output[-3000:]
    return int(generated.group(1)), output


def assert_unharmed(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    info = server.wait_idle(timeout=10)
    assert info["num_requests_running"] == 0 and info["num_requests_waiting"] == 0
    assert info["num_free_blocks"] == info["num_blocks"]
    assert "Traceback" not in server.logs(), server.logs()[-4000:]


def test_every_operation_with_a_valid_key(server, tmp_path):
    num_cases, output = schemathesis(server, tmp_path, with_key=True)
    operations = len(server.get("/openapi.json").json()["paths"])
    assert f"{operations} selected / {operations} total" in output and f"Tested: {operations}" in output
    print(f"\nschemathesis with a key: {num_cases} cases over {operations} operations, seed {SEED}")
    assert_unharmed(server)


def test_every_operation_without_a_key(server, tmp_path):
    num_cases, output = schemathesis(server, tmp_path, with_key=False)
    print(f"\nschemathesis without a key: {num_cases} cases, seed {SEED}")
    assert_unharmed(server)

