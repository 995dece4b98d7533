"""Which grammar library engine/guided.py uses, measured: llguidance against xgrammar on this
machine and the default model's vocabulary (49k byte-level BPE tokens from a GGUF).

    python -m benchmarks.grammar_engines          # xgrammar from the bench extra

For each library: its import time (a fresh interpreter), building its vocabulary from our
Tokenizer.token_bytes, compiling each schema, the per-step cost of the token masks at batch 1
and 32 (every row's mask filled, then every row advanced by one token, walking a valid JSON
document), and coverage: random walks under each library's own mask (a uniformly random
allowed token at every step, as a random model would pick), every finished text checked with
`jsonschema`. A schema a library refuses counts as refused, not invalid: refusing is honest,
letting invalid output through is not.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import machine
from engine.errors import InvalidGrammar

WS = 16                      # whitespace allowed between JSON tokens (engine/guided.py's bound)
S = {"type": "string", "maxLength": 8}
SCHEMAS = {
    "object": ({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                 "age": {"type": "integer", "minimum": 0},
                                                 "tags": {"type": "array", "items": {"type": "string"}},
                                                 "kind": {"enum": ["a", "b", "c"]}},
                "required": ["name", "age", "tags", "kind"], "additionalProperties": False},
               {"name": "Alice Smith", "age": 42, "tags": ["x", "hello world", "foo"], "kind": "b"}),
    "ref+anyOf": ({"$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer"},
                                                                       "price": {"type": "number"}},
                                      "required": ["id", "price"], "additionalProperties": False}},
                   "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"},
                                                              "minItems": 1, "maxItems": 3},
                                                    "note": {"anyOf": [S, {"type": "null"}]}},
                   "required": ["items", "note"], "additionalProperties": False},
                  {"items": [{"id": 1, "price": 2.5}, {"id": 7, "price": -3}], "note": None}),
    "pattern+format": ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,3}$"},
                                                         "day": {"type": "string", "format": "date"},
                                                         "ok": {"type": "boolean"}},
                        "required": ["code", "day", "ok"], "additionalProperties": False},
                       {"code": "AB12", "day": "2024-01-31", "ok": True}),
    "bounds": ({"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 250},
                                                 "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                                 "m": {"type": "integer", "multipleOf": 5, "maximum": 100},
                                                 "s": {"type": "string", "minLength": 3, "maxLength": 5}},
                "required": ["n", "x", "m", "s"], "additionalProperties": False},
               {"n": 17, "x": 0.25, "m": 35, "s": "abcd"}),
    "oneOf+const": ({"oneOf": [{"type": "object", "properties": {"t": {"const": "c"},
                                                                 "r": {"type": "integer", "minimum": 0, "maximum": 9}},
                                "required": ["t", "r"], "additionalProperties": False},
                               {"type": "object", "properties": {"t": {"const": "s"}, "b": {"type": "boolean"}},
                                "required": ["t", "b"], "additionalProperties": False}]},
                    {"t": "s", "b": False}),
    "allOf+additional": ({"type": "object", "allOf": [{"properties": {"a": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9}}, "required": ["a"]}],
                          "properties": {"a": {}, "b": {"type": "boolean"}}, "required": ["b"],
                          "additionalProperties": False},
                         {"a": 1, "b": True}),
    "uniqueItems": ({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3},
                     "minItems": 2, "maxItems": 4, "uniqueItems": True}, [0, 2]),
    "if/then": ({"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 5}},
                 "required": ["a", "b"], "additionalProperties": False,
                 "if": {"properties": {"a": {"const": True}}}, "then": {"properties": {"b": {"const": 1}}}},
                {"a": True, "b": 1}),
    "not": ({"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 5,
                                                    "not": {"const": 3}}},
             "required": ["x"], "additionalProperties": False}, {"x": 4}),
}


class Llguidance:
    """What engine/guided.py does: its compiler, matchers and batched masks."""
    name = "llguidance"

    @staticmethod
    def load() -> None:
        import engine.guided  # noqa: F401  (imports llguidance)

    def __init__(self, tokenizer):
        from engine import guided
        self.guided = guided
        self.vocab = tokenizer.vocab_size
        self.compiler = guided.GrammarCompiler(tokenizer, self.vocab, tokenizer.eos_token_ids)
        self.compiler.lltokenizer()

    def compile(self, schema):
        return self.compiler.compile(self.guided.GuidedDecoding("json", schema))

    def matcher(self, grammar):
        return self.guided.GrammarMatcher(grammar)

    def bitmask(self, n):
        return torch.zeros(n, self.guided.bitmask_words(self.vocab), dtype=torch.int32)

    def masks(self, matchers, bitmask):
        return self.guided.fill_bitmask(matchers, self.vocab, bitmask)

    def accept(self, matcher, token):
        return matcher.accept(token)

    def finished(self, matcher):
        return matcher.is_finished


class Xgrammar:
    name = "xgrammar"

    @staticmethod
    def load() -> None:
        import xgrammar  # noqa: F401

    def __init__(self, tokenizer):
        import xgrammar
        self.xgr = xgrammar
        self.vocab = tokenizer.vocab_size
        info = xgrammar.TokenizerInfo([tokenizer.token_bytes(i) for i in range(self.vocab)], xgrammar.VocabType.RAW,
                                      vocab_size=self.vocab, stop_token_ids=list(tokenizer.eos_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, max_whitespace_cnt=WS)

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def bitmask(self, n):
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def masks(self, matchers, bitmask):
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return bitmask

    def accept(self, matcher, token):
        return matcher.accept_token(token)

    def finished(self, matcher):
        return matcher.is_terminated()


def import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def mask_cost(lib, grammar, ids: list[int], batch: int, repeats: int = 3) -> float:
    """ms per step: every row's mask filled, then every row advanced by the document's next token."""
    best = float("inf")
    for _ in range(repeats):
        matchers, bitmask = [lib.matcher(grammar) for _ in range(batch)], lib.bitmask(batch)
        start = time.perf_counter()
        for token in ids:
            lib.masks(matchers, bitmask)
            for m in matchers:
                lib.accept(m, token)
        best = min(best, (time.perf_counter() - start) / len(ids) * 1e3)
    return best


def coverage(lib, grammar, schema, tokenizer, samples: int, rng) -> tuple[int, int]:
    """(invalid, unfinished) among random walks under the library's mask."""
    import jsonschema
    eos, vocab = set(tokenizer.eos_token_ids), lib.vocab
    invalid = unfinished = 0
    for _ in range(samples):
        matcher, out, bitmask = lib.matcher(grammar), [], lib.bitmask(1)
        for _ in range(300):
            lib.masks([matcher], bitmask)
            allowed = np.flatnonzero(np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[:vocab])
            token = int(rng.choice(allowed))
            if token in eos:
                break
            out.append(token)
            if not lib.accept(matcher, token) or lib.finished(matcher):
                break
        else:
            unfinished += 1
            continue
        try:
            jsonschema.validate(json.loads(tokenizer.decode(out)), schema)
        except (ValueError, jsonschema.ValidationError):
            invalid += 1
    return invalid, unfinished


def measure(lib_cls, tokenizer, samples: int) -> dict:
    result = {"import_s": import_time(lib_cls.name)}
    lib_cls.load()
    start = time.perf_counter()
    lib = lib_cls(tokenizer)
    result["vocab_s"] = time.perf_counter() - start
    rng = np.random.default_rng(0)
    for name, (schema, document) in SCHEMAS.items():
        row: dict = {}
        start = time.perf_counter()
        try:
            grammar = lib.compile(schema)
        except (InvalidGrammar, RuntimeError) as exc:         # ours; xgrammar's
            row["refused"] = str(exc).strip().splitlines()[0][:90]
            result[name] = row
            continue
        row["compile_ms"] = (time.perf_counter() - start) * 1e3
        ids = tokenizer.encode(json.dumps(document), add_special_tokens=False)
        row["b1_ms"], row["b32_ms"] = mask_cost(lib, grammar, ids, 1), mask_cost(lib, grammar, ids, 32)
        row["invalid"], row["unfinished"] = coverage(lib, grammar, schema, tokenizer, samples, rng)
        result[name] = row
    return result


def table(results: dict[str, dict], samples: int) -> str:
    names = list(results)
    lines = [f"| schema | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for key, label in (("import_s", "import (s)"), ("vocab_s", "vocabulary (s)")):
        lines.append(f"| {label} | " + " | ".join(f"{results[n][key]:.2f}" for n in names) + " |")
    for schema in SCHEMAS:
        cells = []
        for n in names:
            row = results[n][schema]
            if "refused" in row:
                cells.append(f"refused: {row['refused']}")
            else:
                cells.append(f"compile {row['compile_ms']:.1f} ms; B1 {row['b1_ms']:.3f} / B32 {row['b32_ms']:.2f} "
                             f"ms/step; invalid {row['invalid']}/{samples}"
                             + (f", unfinished {row['unfinished']}" if row["unfinished"] else ""))
        lines.append(f"| {schema} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=20, help="random walks per schema")
    args = parser.parse_args(argv)
    from engine.loader import load_tokenizer, open_checkpoint
    tokenizer = load_tokenizer(open_checkpoint(args.model))
    print(f"machine: {machine()}; model {args.model} ({tokenizer.vocab_size} tokens)", flush=True)
    results = {}
    for lib_cls in (Llguidance, Xgrammar):
        try:
            results[lib_cls.name] = measure(lib_cls, tokenizer, args.samples)
        except (ImportError, subprocess.CalledProcessError) as exc:
            print(f"{lib_cls.name}: not installed ({exc}); pip install -e '.[bench]'")
    print(table(results, args.samples))


if __name__ == "__main__":
    main()
