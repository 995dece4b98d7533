"""What a request asks of its output's shape, as the engine's one constraint (GuidedDecoding):

    OpenAI   response_format json_object | json_schema (also TGI's {type: json | regex, value}),
             vLLM's guided_json / guided_regex / guided_choice / guided_grammar,
             tool_choice required or named (service/tools.py)
    TGI      parameters.grammar {type: json | json_object | regex | json_schema, value}

At most one per request (422 naming both otherwise). Whether it compiles is the engine's to say,
at admission: a 400 naming the field, before anything is queued.
"""
from __future__ import annotations

from engine.guided import GuidedDecoding
from service.errors import APIError
from service.schemas import GUIDED_FIELDS, ChatCompletionRequest, NamedToolChoice, SamplingFields, TGIGrammar
from service.tools import forced_calls


def openai_constraint(body: SamplingFields) -> GuidedDecoding | None:
    asked = _asked(body)
    if isinstance(body, ChatCompletionRequest) and is_forced(body):
        if asked:
            raise APIError(422, f"{asked[0]}: a forced tool call (tool_choice) is itself the constraint on the "
                           f"output; drop {asked[0]}", param=asked[0], code="invalid_value")
        return forced_calls(body.tools, body.tool_choice, body.parallel_tool_calls is not False)
    if len(asked) > 1:
        raise APIError(422, f"{asked[1]}: give one constraint on the output; {asked[0]} is given too",
                       param=asked[1], code="invalid_value")
    if not asked:
        return None
    if asked[0] == "response_format":
        return _response_format(body)
    kind = asked[0].removeprefix("guided_")
    value = getattr(body, asked[0])
    return GuidedDecoding({"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}[kind],
                          value, param=asked[0])


def _asked(body: SamplingFields) -> list[str]:
    asked = [name for name in GUIDED_FIELDS if getattr(body, name) is not None]
    if body.response_format is not None and body.response_format.type != "text":
        asked.insert(0, "response_format")
    return asked


def _response_format(body: SamplingFields) -> GuidedDecoding:
    fmt = body.response_format
    if fmt.type == "json_schema":
        return GuidedDecoding("json", fmt.json_schema.schema_, param="response_format.json_schema.schema")
    if fmt.type == "regex":
        return GuidedDecoding("regex", fmt.value, param="response_format.value")
    return GuidedDecoding("json", fmt.value, param="response_format" if fmt.value is None else "response_format.value")


def tgi_constraint(grammar: TGIGrammar | None) -> GuidedDecoding | None:
    if grammar is None:
        return None
    if grammar.type == "regex":
        return GuidedDecoding("regex", grammar.value, param="parameters.grammar.value")
    schema = grammar.value["schema"] if grammar.type == "json_schema" else grammar.value
    return GuidedDecoding("json", schema, param="parameters.grammar.value")


def is_forced(body: ChatCompletionRequest) -> bool:
    return bool(body.tools) and (body.tool_choice == "required" or isinstance(body.tool_choice, NamedToolChoice))


def tools_offered(body: ChatCompletionRequest) -> bool:
    """The model is told of the tools and its answer is read for calls (tool_choice not none)."""
    return bool(body.tools) and body.tool_choice != "none"


def check_tool_choice(body: ChatCompletionRequest) -> None:
    names = [tool.function.name for tool in body.tools or []]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise APIError(422, f"tools: the function name {duplicate!r} is given twice", param="tools",
                       code="invalid_value")
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        listed = f"the tools are {', '.join(names)}" if names else "no tools are given"
        raise APIError(422, f"tool_choice: no tool is named {choice.function.name!r} ({listed})",
                       param="tool_choice", code="invalid_value")
    if choice == "required" and not names:
        raise APIError(422, "tool_choice: required needs tools", param="tool_choice", code="invalid_value")
