"""`python tests/fault_server.py <server flags>`: the real server (`service.__main__.main`), with
faults injected into the engine for the requests whose X-Request-Id starts with a marker.
Test-only: the shipped server has no such hook.

    fault-raise-...    the sampler raises for this request's rows (in any batch)
    fault-nan-...      this request's logits are NaN
    fault-detok-...    turning this request's sampled token into text raises
    fault-slow-...     every engine step that runs this request takes 40 ms longer (a slow
                       model), and logs `FAULT prefilling <id>` while its prompt is part done,
                       so that a test can have its client leave mid-prefill

Every abort is logged (`FAULT abort <id> computed=<n>/<prompt tokens> output=<k>`), so a test can
tell where in its life each request was cut: queued, mid-prefill or mid-decode. With
ATTNSERVE_TEST_AUDIT=<marker>, every file the process opens whose path holds the marker is
logged (`AUDIT open <path>`) through a Python audit hook.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service_helpers import REPO, ServerProcess  # noqa: E402

from engine import llm_engine, sampling  # noqa: E402
from engine.outputs import CompletionState  # noqa: E402

FAULTS = ("raise", "nan", "detok", "slow")


def fault_of(request_id: str) -> str | None:
    for fault in FAULTS:
        if request_id.startswith(f"fault-{fault}-"):
            return fault
    return None


@dataclass(slots=True)
class FaultySampleRequest(sampling.SampleRequest):
    fault: str | None = None


class FaultServer(ServerProcess):
    """A ServerProcess that runs this launcher instead of `python -m service`."""

    def start(self, timeout: float = 90.0, wait: bool = True) -> "FaultServer":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *self.args], cwd=REPO, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self


def install_faults() -> None:
    sample_request = llm_engine.LLMEngine._sample_request
    sample = sampling.Sampler.__call__
    add_token = CompletionState.add_token
    abort_request = llm_engine.LLMEngine.abort_request
    run = llm_engine.LLMEngine._run

    def slow_run(self, batch):
        slow = [seq for seq in batch.seqs if fault_of(seq.request_id) == "slow"]
        for seq in slow:
            if 0 < seq.num_computed_tokens < seq.num_prompt_tokens:
                print(f"FAULT prefilling {seq.request_id} computed={seq.num_computed_tokens}"
                      f"/{seq.num_prompt_tokens}", file=sys.stderr, flush=True)
        if slow:
            time.sleep(0.04)
        return run(self, batch)

    def marked_sample_request(self, seq):
        request = sample_request(self, seq)
        fault = fault_of(seq.request_id)
        if fault is None:
            return request
        return FaultySampleRequest(request.params, request.prompt_token_ids, request.output_token_ids,
                                   request.generator, fault)

    def faulty_sample(self, logits, requests, masks=None):
        nan_rows = [i for i, r in enumerate(requests) if getattr(r, "fault", None) == "nan"]
        if nan_rows:
            logits = logits.clone()
            logits[nan_rows] = float("nan")
        if any(getattr(r, "fault", None) == "raise" for r in requests):
            raise RuntimeError("injected sampler fault")
        return sample(self, logits, requests, masks)

    def faulty_abort(self, request_id):
        request = self.requests.get(request_id)
        if request is not None:
            seq = request.seqs[0]
            print(f"FAULT abort {request_id} computed={min(seq.num_computed_tokens, seq.num_prompt_tokens)}"
                  f"/{seq.num_prompt_tokens} output={seq.num_output_tokens}", file=sys.stderr, flush=True)
        abort_request(self, request_id)

    llm_engine.LLMEngine._sample_request = marked_sample_request
    sampling.Sampler.__call__ = faulty_sample
    llm_engine.LLMEngine.abort_request = faulty_abort
    llm_engine.LLMEngine._run = slow_run

    # CompletionState knows no request id: the marked requests' states are tagged when added.
    add_request = llm_engine.LLMEngine.add_request

    def marking_add_request(self, request_id, *args, **kwargs):
        add_request(self, request_id, *args, **kwargs)
        if fault_of(request_id) == "detok":
            for completion in self.requests[request_id].completions:
                completion.injected_fault = True

    def faulty_add_token(self, *args, **kwargs):
        if getattr(self, "injected_fault", False):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return add_token(self, *args, **kwargs)

    llm_engine.LLMEngine.add_request = marking_add_request
    CompletionState.add_token = faulty_add_token


def install_audit(marker: str) -> None:
    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and marker in str(args[0]):
            print(f"AUDIT open {args[0]}", file=sys.stderr, flush=True)
    sys.addaudithook(hook)


if __name__ == "__main__":
    install_faults()
    if os.environ.get("ATTNSERVE_TEST_AUDIT"):
        install_audit(os.environ["ATTNSERVE_TEST_AUDIT"])
    from service.__main__ import main
    sys.exit(main(sys.argv[1:]))
