"""Server settings: each flag `--x-y` is also the environment variable `ATTNSERVE_X_Y`.

Flags win over the environment, the environment over defaults. `--api-key` repeats; its
environment form is `ATTNSERVE_API_KEYS`, a comma-separated list (`ATTNSERVE_API_KEY` holds one).
`--embedding-model`, `--classifier-model` and `--reranker-model` repeat too (each entry a
model or NAME=PATH); their environment forms are comma lists.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Annotated, Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.config import EncoderConfig, EngineConfig, parse_bytes

ENV_PREFIX = "ATTNSERVE_"
_NO_MODEL = ("", "none", "null", "off")

_HELP = {
    "model": "generation model: a default name, an HF checkpoint dir or a .gguf file "
             "('none' serves encoders only, like TEI)",
    "embedding_model": "encoder for /embed, /v1/embeddings, /similarity, and /embed_sparse and /fill_mask "
                       "when it has a masked-LM head: a default name, a directory, or NAME=PATH to serve it "
                       "as NAME (repeatable: requests pick one by `model`; the first is the default; "
                       "'none' serves no encoder)",
    "classifier_model": "encoder for /classify (repeatable, NAME=PATH; unset: the embedding models, zero-shot)",
    "reranker_model": "cross-encoder for /rerank and /v1/rerank (repeatable, NAME=PATH; a bi-encoder reranks "
                      "by cosine; unset: the embedding models, by cosine)",
    "api_keys": "accepted bearer key (repeatable); none configured means no auth",
    "kv_cache_memory": "bytes for the KV pool, e.g. 2GiB (unset: decided by the device)",
    "max_queue": "waiting generation requests beyond which new ones get 429",
    "max_prefill_tokens": "prompt tokens per engine step while decodes run, so a long prompt "
                          "cannot stall the streams (unset: on a CPU two per running decode, at "
                          "least 32; on a GPU the whole step)",
    "drain_timeout": "seconds SIGTERM lets running requests finish before aborting them",
    "log_prompts": "log prompt text (off: only sizes are logged)",
    "max_body_bytes": "largest request body accepted (413 beyond; 0 = no limit)",
    "read_timeout": "seconds a client has to send a request's headers, and then its body "
                    "(the connection is closed, after a 408 for a late body; 0 = no limit)",
    "cors_origins": "origins allowed by CORS (comma list; off by default)",
    "quantization": "auto: a Q4_0/Q4_1/Q8_0 GGUF keeps its blocks on the CPU; none: float weights; "
                    "int8 / int4: quantize every linear at load (CPU; see BENCHMARKS.md)",
    "tensor_parallel_size": "ranks the generation model is split over (whole heads per rank; "
                            "nccl on GPUs, gloo on the CPU); the server starts the other ranks "
                            "itself, or torchrun starts them all",
    "max_batch_tokens": "encoder: most tokens (padding included) in one batch",
    "max_batch_size": "encoder: most inputs in one batch",
    "batch_wait_ms": "encoder: longest an input waits for others to fill its batch",
    "max_encoder_queue": "inputs waiting for the encoders beyond which new requests get 429 (one "
                         "request may hold up to this many, at most 2048)",
    "max_tokenize_concurrency": "/tokenize and /detokenize calls served at once (429 beyond), by "
                                "as many worker processes of their own",
    "strict_model_names": "answer 404 to a model name that is not served (off: a name no model "
                          "has falls back to the one model of its task, as TGI and llama.cpp do)",
    "auto_truncate": "encoders: cut inputs longer than the model allows instead of answering 400 "
                     "(a request's own truncate / truncate_prompt_tokens still wins)",
    "max_new_tokens_limit": "most new tokens one request may ask for (422 beyond; unset: the "
                            "model's length)",
    "default_max_tokens": "new tokens of a request that names none (unset: each route's own "
                          "default: TGI 100, completions 16, chat the rest of the model's length)",
}


def _default(config: type, name: str) -> Any:
    """A setting's default is its engine config's: one place for each."""
    return next(f.default for f in dataclasses.fields(config) if f.name == name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True,
                                      protected_namespaces=())

    model: str | None = "smollm2-135m-instruct"
    embedding_model: Annotated[list[str], NoDecode] = ["all-minilm-l6-v2"]
    classifier_model: Annotated[list[str], NoDecode] = []
    reranker_model: Annotated[list[str], NoDecode] = []
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = []
    device: str = _default(EngineConfig, "device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _default(EngineConfig, "dtype")
    quantization: Literal["auto", "none", "int8", "int4"] = _default(EngineConfig, "quantization")
    tensor_parallel_size: int = Field(_default(EngineConfig, "tensor_parallel_size"), ge=1)
    max_num_seqs: int = Field(_default(EngineConfig, "max_num_seqs"), ge=1)
    max_num_batched_tokens: int = Field(_default(EngineConfig, "max_num_batched_tokens"), ge=1)
    max_prefill_tokens: int | None = Field(_default(EngineConfig, "max_prefill_tokens"), ge=1)
    block_size: int = Field(_default(EngineConfig, "block_size"), ge=1)
    kv_cache_memory: int | None = _default(EngineConfig, "kv_cache_memory")
    max_model_len: int | None = Field(_default(EngineConfig, "max_model_len"), ge=2)
    max_queue: int = Field(256, ge=1)
    enable_prefix_caching: bool = _default(EngineConfig, "enable_prefix_caching")
    drain_timeout: float = Field(30.0, ge=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_prompts: bool = False
    max_body_bytes: int = Field(4 * 2**20, ge=0)
    read_timeout: float = Field(60.0, ge=0)
    cors_origins: Annotated[list[str], NoDecode] = []
    max_batch_tokens: int = Field(_default(EncoderConfig, "max_batch_tokens"), ge=1)
    max_batch_size: int = Field(_default(EncoderConfig, "max_batch_size"), ge=1)
    batch_wait_ms: float = Field(_default(EncoderConfig, "batch_wait_ms"), ge=0)
    max_tokenize_concurrency: int = Field(2, ge=1)
    max_encoder_queue: int = Field(_default(EncoderConfig, "max_queue"), ge=1)
    strict_model_names: bool = False
    auto_truncate: bool = False
    max_new_tokens_limit: int | None = Field(None, ge=1)
    default_max_tokens: int | None = Field(None, ge=1)

    @field_validator("model", mode="before")
    @classmethod
    def _none_means_off(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() in _NO_MODEL else value

    @field_validator("api_keys", "cors_origins", "embedding_model", "classifier_model", "reranker_model",
                     mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("embedding_model", "classifier_model", "reranker_model")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        """'none' (alone) serves none; each entry is a model or NAME=PATH."""
        value = [entry for entry in value if entry.strip().lower() not in _NO_MODEL]
        for entry in value:
            name, path = encoder_spec(entry)
            if not name or not path:
                raise ValueError(f"not a model nor NAME=PATH: {entry!r}")
        return value

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NO_MODEL):
            return None
        try:
            return parse_bytes(value)
        except ValueError:
            raise ValueError(f"not a size like 2GiB or 512MiB: {value!r}") from None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _serves_something(self) -> "Settings":
        if self.model is None and not self.encoders():
            raise ValueError("no model to serve: --model, --embedding-model, --classifier-model and "
                             "--reranker-model are all none")
        if self.model is None and self.tensor_parallel_size > 1:
            raise ValueError("--tensor-parallel-size splits the generation model, and --model is none")
        paths: dict[str, str] = {}
        for _, name, path in self.encoders():
            if paths.setdefault(name, path) != path:
                raise ValueError(f"the model name {name!r} is given to two models: {paths[name]!r} and {path!r}")
        limit, default = self.max_new_tokens_limit, self.default_max_tokens
        if limit is not None and default is not None and default > limit:
            raise ValueError(f"--default-max-tokens {default} exceeds --max-new-tokens-limit {limit}")
        return self

    def encoders(self) -> list[tuple[str, str, str]]:
        """(role, name, path) of every encoder flag, in order; role: embed, classify or rerank."""
        roles = (("embed", self.embedding_model), ("classify", self.classifier_model),
                 ("rerank", self.reranker_model))
        return [(role, *encoder_spec(entry)) for role, entries in roles for entry in entries]

    def engine_config(self) -> EngineConfig:
        """The generation engine these flags describe."""
        return EngineConfig(
            device=self.device, dtype=self.dtype, block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_prefill_tokens=self.max_prefill_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching, quantization=self.quantization,
            tensor_parallel_size=self.tensor_parallel_size)

    def encoder_config(self) -> EncoderConfig:
        """The encoders these flags describe."""
        per_request = min(_default(EncoderConfig, "max_inputs_per_request"), self.max_encoder_queue)
        return EncoderConfig(
            device=self.device, dtype=self.dtype, max_batch_tokens=self.max_batch_tokens,
            max_batch_size=self.max_batch_size, batch_wait_ms=self.batch_wait_ms,
            max_queue=self.max_encoder_queue, max_inputs_per_request=per_request)

    def __repr__(self) -> str:                # keys never reach logs
        shown = {k: ("***" if k == "api_keys" and v else v) for k, v in self.model_dump().items()}
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    __str__ = __repr__


def encoder_spec(entry: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain model (a default name or a path) is its own name.
    (A path holding '=' after a '/' is a path: names have no '/'.)"""
    name, sep, path = entry.strip().partition("=")
    if sep and "/" not in name:
        return name.strip(), path.strip()
    return entry.strip(), entry.strip()


_REPEATABLE = {"api_keys": "KEY", "embedding_model": "MODEL", "classifier_model": "MODEL", "reranker_model": "MODEL"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service", description="attnserve: TGI/TEI/OpenAI-compatible inference server",
        epilog=f"Every flag --x-y may also be set as the environment variable {ENV_PREFIX}X_Y.")
    for name, field in Settings.model_fields.items():
        flag = "--" + ("api-key" if name == "api_keys" else name.replace("_", "-"))
        default = "" if field.default in (None, []) else f" (default: {field.default!r})"
        help_text = (_HELP.get(name, "") + default).strip()
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif name in _REPEATABLE:
            parser.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS,
                                metavar=_REPEATABLE[name], help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)
    return parser


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Flags over ATTNSERVE_* environment variables over defaults."""
    given = vars(build_parser().parse_args(argv))
    if "api_keys" not in given and os.environ.get(f"{ENV_PREFIX}API_KEY") \
            and not os.environ.get(f"{ENV_PREFIX}API_KEYS"):
        given["api_keys"] = os.environ[f"{ENV_PREFIX}API_KEY"]
    return Settings(**given)
