"""Request and response models of every route, with the bounds the server enforces.

Requests forbid unknown fields (a misspelt option silently ignored is worse than a 422), but
accept what real TGI / OpenAI clients send. Options we accept only at their neutral value
(TGI's `watermark`, `best_of`; OpenAI's `suffix`, ...) answer 422 otherwise.
Bounds that depend on the model (max_tokens <= max_model_len, logit_bias ids) are checked in
the routes; a schema, regex or grammar is compiled at admission (400 if it does not compile).
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from engine.encoder_tasks import MAX_FILL_MASK_TOP_K
from engine.guided import MAX_CHOICES
from engine.sampling import (MAX_ABS_PENALTY, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_REPETITION_PENALTY, MAX_SEED,
                             MAX_TEMPERATURE, MAX_TOP_LOGPROBS)

# What the HTTP API allows beyond the engine's own bounds (imported above).
MAX_STOP = 16                 # stop strings per request
MAX_STOP_CHARS = 512
MAX_N = 16                    # completions per prompt
MAX_PROMPTS = 32              # prompts in one /v1/completions request
MAX_TOP = MAX_TOP_LOGPROBS    # top logprobs / top_n_tokens
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_IDS = 1_000_000
MAX_TOKENS_BOUND = 2**31 - 1  # the static bound; the model's own is checked per request
MAX_MESSAGES = 1024
MAX_TOOLS = 128               # functions offered in one request
MAX_TOOL_CALLS = 128          # calls in one assistant message



def _integral(value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer; strict pydantic would not
    return int(value) if isinstance(value, float) and value.is_integer() else value


def int_in(ge: int, le: int | None = None):
    """An integer field in [ge, le] (the bounds land in the JSON schema)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_integral)]


PositiveInt = int_in(1, MAX_TOKENS_BOUND)
Seed = int_in(0, MAX_SEED)
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
TopK = int_in(-1, MAX_TOKENS_BOUND)
Penalty = Annotated[float, Field(ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=MAX_REPETITION_PENALTY)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = int_in(0, 2**31 - 1)


def _integral_items(value: Any) -> Any:
    # One call for the whole list, then pydantic checks each item natively: a million ids
    # validated item by item in Python held the event loop for most of a second.
    if isinstance(value, list) and float in set(map(type, value)):
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    return value


def token_ids(min_length: int = 0, max_length: int = MAX_PROMPT_IDS):
    """A list of token ids (integral floats such as 5.0 taken as ints, as JSON Schema does)."""
    return Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]],
                     Field(min_length=min_length, max_length=max_length), BeforeValidator(_integral_items)]
NonEmptyText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
BiasValue = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]


def _nullable_optionals(schema: dict[str, Any]) -> None:
    """JSON Schema of a request body: every optional property also takes null (its default)."""
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        if name in required or _takes_null(prop):
            continue
        meta = {key: prop.pop(key) for key in ("default", "description", "title") if key in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **meta}


def _takes_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(branch.get("type") == "null" for branch in prop.get("anyOf", []))


class Strict(BaseModel):
    """A request body: unknown fields and coerced types (\"1\" for 1, 0 for false) are errors,
    and so is text that is not Unicode. An explicit null means the field's default, on every
    optional field (OpenAI's API takes null for each, and SDKs and proxies send it)."""
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_nullable_optionals)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if value is not None or key not in fields or fields[key].is_required()}

    @field_validator("*")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        # JSON may escape a lone surrogate ("\ud800"); no tokenizer or UTF-8 encoder takes it.
        # (Nested request models check their own fields: the error names the innermost one.)
        pending = [value]
        while pending:                       # (iterative: JSON nests up to ~1000 levels)
            item = pending.pop()
            if isinstance(item, str):
                if not item.isascii() and _SURROGATE.search(item):     # (1 MB: 5 ms on the event loop)
                    raise ValueError("the text is not valid Unicode (it holds a lone surrogate)")
            elif isinstance(item, list):
                if set(map(type, item)) != {int}:      # (a million token ids: passed over in C)
                    pending += item
            elif isinstance(item, dict):
                pending += item.keys()
                pending += item.values()
        return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _neutral(value: Any, neutral: tuple, what: str) -> Any:
    if not any(_same(value, n) for n in neutral):
        raise ValueError(f"{what} is not supported by this server")
    return value


def _same(value: Any, neutral: Any) -> bool:
    if neutral is None or isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral                     # 0 is not false, 1 is not true
    numbers = (int, float)
    return (type(value) is type(neutral) or (isinstance(value, numbers) and isinstance(neutral, numbers))) \
        and value == neutral


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# --- errors ------------------------------------------------------------------------------

class NativeError(BaseModel):
    error: str
    error_type: Literal["validation", "not_found", "overloaded", "generation", "unauthorized", "not_ready"]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


# --- TGI: /generate, /generate_stream, / ------------------------------------------------

class TGIGrammar(Strict):
    """TGI's grammar: {"type": "json", "value": schema} (also as JSON text; "json_object" is an
    alias), {"type": "regex", "value": pattern}, {"type": "json_schema", "value": {"name", "schema"}}."""
    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any = Field(description="the JSON schema (an object, or its JSON text), the regex, or "
                       "{name, schema} for json_schema")

    @model_validator(mode="after")
    def _value_shape(self):
        value = self.value
        if self.type == "regex":
            if not isinstance(value, str) or not value:
                raise ValueError("value: a regex grammar takes a non-empty pattern string")
        elif self.type == "json_schema":
            if not isinstance(value, dict) or not isinstance(value.get("schema"), dict) or \
                    set(value) - {"name", "schema", "description", "strict"}:
                raise ValueError("value: a json_schema grammar takes {\"name\": ..., \"schema\": {...}}")
        else:
            self.value = _json_schema_value(value)
        return self


def _json_schema_value(value: Any) -> dict:
    # TGI takes the schema as an object or as its JSON text.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("value: the JSON schema text is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError("value: a JSON schema is an object")
    return value


class GenerateParameters(Strict):
    max_new_tokens: PositiveInt | None = Field(100, description="default 100, as TGI")
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    min_p: MinP | None = None
    typical_p: Annotated[float, Field(ge=1.0, le=1.0)] | None = Field(None, description="not supported: null or 1.0")
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    do_sample: bool = Field(False, description="false and no sampling option set: greedy")
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = []
    details: bool = False
    decoder_input_details: bool = Field(
        False, description="with details on /generate: details.prefill holds each prompt token's id, text and "
        "logprob (the first's null); a stream has no prefill")
    top_n_tokens: int_in(0, MAX_TOP) | None = None
    return_full_text: bool | None = None
    truncate: PositiveInt | None = Field(None, description="keep only the last N prompt tokens")
    ignore_eos: bool = False
    watermark: Literal[False] = Field(False, description="not supported: false")
    best_of: int_in(1, 1) | None = Field(None, description="not supported: null or 1")
    adapter_id: None = Field(None, description="not supported: null")
    grammar: TGIGrammar | None = Field(None, description="constrain the text: a JSON schema or a regex "
                                         "(400 if it does not compile)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return _stop_list(v)

    @field_validator("typical_p", mode="before")
    @classmethod
    def _typical(cls, v):
        return _neutral(v, (None, 1.0), "typical_p other than 1.0")

    @field_validator("watermark", mode="before")
    @classmethod
    def _watermark(cls, v):
        return _neutral(v, (False,), "watermark")

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of(cls, v):
        return _neutral(v, (None, 1), "best_of > 1")

    @field_validator("adapter_id", mode="before")
    @classmethod
    def _null_only(cls, v, info):
        return _neutral(v, (None,), info.field_name)


class GenerateRequest(Strict):
    inputs: NonEmptyText
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="only on POST /: stream like /generate_stream")


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="log-probability given the tokens before it; null for the first")


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One SSE event of /generate_stream; the last carries generated_text and details."""
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class TokenizeRequest(Strict):
    inputs: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
    add_special_tokens: bool = True
    parameters: dict | None = Field(None, description="accepted for TGI compatibility; unused")


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class DetokenizeRequest(Strict):
    inputs: token_ids()
    skip_special_tokens: bool = True


class DetokenizeResponse(BaseModel):
    text: str


# --- admin -------------------------------------------------------------------------------

class ServedModel(BaseModel):
    id: str
    tasks: list[str] = Field(description="what it answers: generate, or the encoder tasks embed, similarity, "
                             "classify, rerank, embed_sparse, fill_mask")
    max_input_tokens: int
    dimension: int | None = Field(None, description="encoders: the hidden size (dense embeddings' length)")
    rerank_scoring: Literal["cross-encoder", "cosine"] | None = Field(
        None, description="when it reranks: by its one-label head, or (a bi-encoder) by cosine")
    prompts: list[str] = Field(default_factory=list, description="prompt names it takes (prompt_name)")
    default_prompt_name: str | None = None


class Info(BaseModel):
    model_id: str
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str = "text-generation"     # "text2text-generation" for T5
    is_encoder_decoder: bool = False          # the prompt is encoded; the decoder generates apart
    max_input_tokens: int
    # The generation engine's; null on an encoder-only server (--model none).
    max_total_tokens: int | None = None
    max_model_len: int | None = None
    max_new_tokens_default: int | None = None
    block_size: int | None = None
    num_blocks: int | None = None
    num_free_blocks: int | None = None
    kv_cache_usage: float | None = None
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    max_num_seqs: int | None = None
    quantization: str | None = None           # what the weights run as, and why (e.g. a GGUF's blocks)
    max_queue: int
    max_stop_sequences: int | None = None
    max_best_of: int | None = None
    embedding_model_id: str | None = None     # each task's default encoder (the first named)
    classifier_model_id: str | None = None
    reranker_model_id: str | None = None
    models: list[ServedModel] = Field(default_factory=list, description="every model served, with its tasks")
    max_batch_tokens: int                     # the encoders' batch limits (TEI's names)
    max_batch_size: int
    num_queued_inputs: int = 0                # inputs waiting for the encoders
    version: str


class Health(BaseModel):
    status: Literal["ok", "ready"]


# --- OpenAI ------------------------------------------------------------------------------

class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(Strict):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="null: any JSON object")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema", "json", "regex"] = Field(
        description="json and regex take TGI's `value` (huggingface_hub's chat_completion sends them)")
    json_schema: JsonSchemaFormat | None = None
    value: Any = Field(None, description="TGI's form: the schema (json, json_object) or the pattern (regex)")

    @model_validator(mode="after")
    def _fields_of_type(self):
        if self.type == "json_schema" and self.json_schema is None:
            if not isinstance(self.value, dict) or not isinstance(self.value.get("schema"), dict):
                raise ValueError("json_schema: required when type is json_schema")
            self.json_schema = JsonSchemaFormat(name=self.value.get("name") or "schema", schema=self.value["schema"])
            self.value = None
        elif self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema: only with type json_schema, not {self.type}")
        if self.type == "regex" and (not isinstance(self.value, str) or not self.value):
            raise ValueError("value: type regex takes the pattern in value")
        if self.type == "json" or (self.type == "json_object" and self.value is not None):
            self.value = _json_schema_value(self.value)
        if self.type == "text" and self.value is not None:
            raise ValueError("value: only with type json, json_object or regex")
        return self


class SamplingFields(Strict):
    """What completions and chat share."""
    model: str | None = Field(None, description="the served model id (see /v1/models); null: it")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    n: int_in(1, MAX_N) = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool = False
    user: str | None = None
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], BiasValue],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = Field(
        None, description=f"token id (as a string) -> a bias in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] added to its "
        "logit before sampling (-100 bans the token, +100 all but forces it); ids outside the vocabulary: 422")
    response_format: ResponseFormat | None = Field(
        None, description="text; json_object (any JSON object); json_schema {name, schema, strict} (the text "
        "follows the schema); TGI's {type: json | regex, value} too")
    guided_json: dict[str, Any] | None = Field(None, description="vLLM's: a JSON schema the text follows")
    guided_regex: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="vLLM's: a regular expression the whole text matches")
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]],
                             Field(min_length=1, max_length=MAX_CHOICES)] | None = Field(
        None, description="vLLM's: the text is exactly one of these strings")
    guided_grammar: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a Lark grammar in llguidance's dialect (%json {...} embeds a schema)")


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


PromptIds = token_ids(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: NonEmptyText | PromptIds | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_PROMPTS)] \
        | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: PositiveInt | None = Field(16, description="default 16, as OpenAI")
    logprobs: int_in(0, MAX_TOP) | None = None
    echo: bool = Field(False, description="the prompt starts the text; with logprobs, the prompt tokens' logprobs "
                       "and top-k too (the first token's null)")
    best_of: int_in(1, 1) | None = Field(None, description="not supported: null or 1")
    suffix: Literal[""] | None = Field(None, description="not supported: null")

    @field_validator("suffix", "best_of", mode="before")
    @classmethod
    def _unsupported(cls, v, info):
        return _neutral(v, (None, "") if info.field_name == "suffix" else (None, 1), info.field_name)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        # One sentence, rather than what each of the four accepted forms disliked.
        if v == "" or v == []:
            raise ValueError("the prompt is empty: send text, token ids, or a list of either")
        if not isinstance(v, (str, list)):
            raise ValueError("the prompt must be text, token ids, or a list of either")
        return v


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    arguments: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = Field(description="the arguments, as JSON text")


class ToolCall(Strict):
    id: Annotated[str, Field(max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] \
        | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: str | None = None
    tool_call_id: str | None = Field(None, description="role tool: the call this message answers")
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = Field(
        None, description="role assistant: the calls it made (rendered through the chat template)")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments; null: none")
    strict: bool | None = Field(None, description="accepted; forced calls always follow the schema")


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: PositiveInt | None = Field(None, description="null: up to the model's length")
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: int_in(0, MAX_TOP) | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="functions the model may call; the chat template receives them")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none; auto (the model answers or calls; default with tools); required (at least "
        "one call, forced by a grammar); {type: function, function: {name}} (that call, forced)")
    parallel_tool_calls: bool | None = Field(None, description="default true; false: at most one call")
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="more variables for the chat template (e.g. enable_thinking); not messages, tools, "
        "add_generation_prompt or chat_template")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, v):
        reserved = sorted(set(v or ()) & {"messages", "tools", "add_generation_prompt", "chat_template"})
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set here (the request's own fields set them)")
        return v

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob] | None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCallOut(BaseModel):
    id: str = Field(description="call_...")
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is only tool calls")
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """The first delta of a call has its id, type and name; later ones add argument text."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion; the stream ends with `data: [DONE]`."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "attnserve"
    max_model_len: int | None = None
    task: Literal["generate", "embed", "classify", "rerank", "embed_sparse", "fill_mask"] = Field(
        description="its main task: the first of tasks")
    tasks: list[str] = Field(description="every task it serves (embed models also answer similarity)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- encoders: TEI /embed, /classify, /rerank, /similarity, /embed_sparse; /fill_mask;
# OpenAI /v1/embeddings; Cohere / Jina /v1/rerank ------------------------------------------

MAX_EMBED_INPUTS = 2048       # the encoder engine's per-request limit
MAX_LABELS = 64
MAX_FILL_MASK_INPUTS = 64

EmbedInputs = NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBED_INPUTS)] \
    | PromptIds | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
Texts = Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
TruncationDirection = Literal["Right", "right", "Left", "left"]


def _model_field(task: str):
    return Field(None, description=f"the served {task} model to use, by its id (see /v1/models); null: the "
                 "first one the server was started with")


def _truncate_field():
    return Field(None, description="cut inputs longer than the model allows (else 400); null: the server's "
                 "--auto-truncate")


def _direction_field():
    return Field("Right", description="which end truncation cuts: Right (the end) or Left (the start)")


def _prompt_field():
    return Field(None, description="a prompt of the model's sentence-transformers config (config_sentence_"
                 "transformers.json), put before each text input; null: its default_prompt_name, if any")


class EmbedRequest(Strict):
    inputs: EmbedInputs = Field(description="a text, token ids, or a list of up to 2,048 of either")
    normalize: bool = Field(True, description="L2-normalize each vector")
    truncate: bool | None = _truncate_field()
    truncation_direction: TruncationDirection = _direction_field()
    prompt_name: Annotated[str, Field(min_length=1, max_length=256)] | None = _prompt_field()
    dimensions: int_in(1) | None = Field(None, description="keep the first N dimensions (Matryoshka), then "
                                         "L2-normalize (unless normalize=false); null: all of them")
    model: str | None = _model_field("embedding")


CandidateLabels = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                            Field(min_length=1, max_length=MAX_LABELS, json_schema_extra={"uniqueItems": True})]


class ClassifyParameters(Strict):
    """Where huggingface_hub's text_classification and zero_shot_classification put options."""
    top_k: int_in(1, MAX_LABELS) | None = Field(None, description="keep the best k labels")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="scores from the head's logits; null: softmax (sigmoid for multi-label heads)")
    candidate_labels: CandidateLabels | None = Field(None, description="zero-shot labels (as top-level)")
    multi_label: bool = Field(False, description="zero-shot: score each label alone, in [0, 1]")
    hypothesis_template: Annotated[str, Field(min_length=2, max_length=256)] | None = Field(
        None, description="zero-shot: each label is embedded as this text with {} replaced by it")


class ClassifyRequest(Strict):
    inputs: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_EMBED_INPUTS)] \
        = Field(description="a text or a list of up to 2,048 texts")
    candidate_labels: CandidateLabels | None = Field(
        None, description="zero-shot labels; null: the model's own classification head (a model "
        "without one needs labels: 422 otherwise)")
    truncate: bool | None = _truncate_field()
    truncation_direction: TruncationDirection = _direction_field()
    raw_scores: Literal[False] = Field(False, description="not supported: false")
    parameters: ClassifyParameters | None = Field(None, description="huggingface_hub's place for the "
                                                  "options (candidate_labels given once)")
    model: str | None = _model_field("classifier")

    @field_validator("raw_scores", mode="before")
    @classmethod
    def _raw_scores(cls, v):
        return _neutral(v, (False,), "raw_scores")

    @model_validator(mode="after")
    def _labels_once(self):
        if self.candidate_labels is not None and self.parameters and self.parameters.candidate_labels is not None:
            raise ValueError("candidate_labels is given twice (top level and parameters): give it once")
        return self

    @property
    def labels(self) -> list[str] | None:
        return self.candidate_labels or (self.parameters.candidate_labels if self.parameters else None)


class LabelScore(BaseModel):
    label: str
    score: float


class RerankRequest(Strict):
    """TEI's /rerank."""
    query: NonEmptyText = Field(description="read first in each (query, text) pair")
    texts: Texts = Field(description="up to 2,048 texts to score against the query")
    raw_scores: bool = Field(False, description="a cross-encoder's logits, not their sigmoid")
    return_text: bool = Field(False, description="each answer also holds its text")
    truncate: bool | None = Field(None, description="cut a (query, text) pair longer than the model allows, "
                                  "the longer of the two first (else 400); null: the server's --auto-truncate")
    truncation_direction: TruncationDirection = _direction_field()
    model: str | None = _model_field("reranker")


class RankedText(BaseModel):
    index: int = Field(description="the text's position in the request")
    score: float = Field(description="cross-encoder: sigmoid of its logit (raw_scores: the logit); "
                         "bi-encoder: the cosine of the query's and the text's embeddings")
    text: str | None = Field(None, description="with return_text")


class RerankDocument(Strict):
    text: NonEmptyText = Field(description="the document's text")


class CohereRerankRequest(Strict):
    """Cohere's rerank (v1 and v2) and Jina's, as vLLM, LiteLLM, LangChain and LlamaIndex send it."""
    model: str | None = _model_field("reranker")
    query: NonEmptyText = Field(description="never cut: 400 when it leaves a document no room")
    documents: Annotated[list[NonEmptyText | RerankDocument], Field(min_length=1, max_length=MAX_EMBED_INPUTS)] \
        = Field(description="texts, or {text} objects")
    top_n: int_in(1) | None = Field(None, description="answer the best N; null: all")
    return_documents: bool = Field(False, description="each result also holds its document as {text}")
    max_tokens_per_doc: int_in(1, MAX_TOKENS_BOUND) | None = Field(
        None, description="cut each document to N tokens first. Documents that do not fit beside the query are "
        "cut to fit; the query is never cut (400 when it leaves no room)")
    max_chunks_per_doc: None = Field(None, description="not supported: null")
    rank_fields: None = Field(None, description="not supported: null")
    relevant_spans: None = Field(None, description="not supported: null")
    priority: Literal[0] | None = Field(None, description="one queue serves every request: null or 0")

    @field_validator("max_chunks_per_doc", "rank_fields", "relevant_spans", mode="before")
    @classmethod
    def _null_only(cls, v, info):
        return _neutral(v, (None,), info.field_name)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, v):
        return _neutral(v, (None, 0), "priority other than 0")

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float = Field(description="cross-encoder: sigmoid of its logit, in [0, 1]; bi-encoder: "
                                   "the cosine of the query's and the document's embeddings")
    document: RerankDocument | None = Field(None, description="with return_documents")


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult] = Field(description="best first")
    usage: RerankUsage
    meta: dict = Field(description="Cohere's: api_version, billed_units, tokens")


class SimilarityInputs(Strict):
    source_sentence: NonEmptyText = Field(description="what each sentence is compared with")
    sentences: Texts = Field(description="up to 2,048 sentences")


class SimilarityParameters(Strict):
    """Where huggingface_hub's sentence_similarity puts options."""
    truncate: bool | None = _truncate_field()
    truncation_direction: TruncationDirection | None = Field(None, description="as top-level")
    prompt_name: Annotated[str, Field(min_length=1, max_length=256)] | None = _prompt_field()


class SimilarityRequest(Strict):
    inputs: SimilarityInputs = Field(description="the Hugging Face Inference API's sentence-similarity input")
    truncate: bool | None = _truncate_field()
    truncation_direction: TruncationDirection = _direction_field()
    prompt_name: Annotated[str, Field(min_length=1, max_length=256)] | None = _prompt_field()
    parameters: SimilarityParameters | None = Field(None, description="huggingface_hub's place for the same "
                                                    "options; what is set here wins")
    model: str | None = _model_field("embedding")


class SparseEmbedRequest(Strict):
    inputs: EmbedInputs = Field(description="a text, token ids, or a list of up to 2,048 of either")
    truncate: bool | None = _truncate_field()
    truncation_direction: TruncationDirection = _direction_field()
    prompt_name: None = Field(None, description="not supported: null")
    model: str | None = _model_field("sparse-embedding")


class SparseValue(BaseModel):
    index: int = Field(description="a vocabulary id")
    value: float = Field(description="its weight, > 0 (ids with weight 0 are left out)")


class FillMaskParameters(Strict):
    """Where huggingface_hub's fill_mask puts options."""
    top_k: int_in(1, MAX_FILL_MASK_TOP_K) | None = Field(None, description="proposals per mask (default 5)")
    targets: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                       Field(min_length=1, max_length=MAX_LABELS)] | None = Field(
        None, description="only these tokens (a word not in the vocabulary: its first token)")


class FillMaskRequest(FillMaskParameters):
    inputs: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_FILL_MASK_INPUTS)] \
        = Field(description="text holding the model's mask token ([MASK] for BERT), or a list of such")
    parameters: FillMaskParameters | None = Field(None, description="huggingface_hub's place for top_k and "
                                                  "targets (give each once)")
    truncate: bool | None = _truncate_field()
    model: str | None = _model_field("masked-LM")

    @model_validator(mode="after")
    def _options_once(self):
        for name in ("top_k", "targets"):
            if getattr(self, name) is not None and self.parameters and getattr(self.parameters, name) is not None:
                raise ValueError(f"{name} is given twice (top level and parameters): give it once")
        return self

    def option(self, name: str):
        value = getattr(self, name)
        return value if value is not None or self.parameters is None else getattr(self.parameters, name)


class FillMaskProposal(BaseModel):
    token: int
    token_str: str
    score: float
    sequence: str = Field(description="the input with this mask filled")


class EmbeddingRequest(Strict):
    input: EmbedInputs = Field(description="a text, token ids, or a list of up to 2,048 of either")
    model: str | None = _model_field("embedding")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32")
    dimensions: int_in(1) | None = Field(None, description="keep the first N dimensions (Matryoshka), then "
                                         "L2-normalize; null: all of them")
    user: str | None = Field(None, description="accepted, unused")
    truncate_prompt_tokens: Annotated[int, Field(ge=-1), BeforeValidator(_integral)] | None = Field(
        None, description="cut each input to at most N tokens (-1: the model's maximum), as vLLM; "
        "null: the server's --auto-truncate")

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_tokens(cls, v):
        if v == 0:
            raise ValueError("must be -1 (the model's maximum) or a number of tokens >= 1")
        return v


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
