"""Tool calling: the Hermes-block reader (streamed in any pieces, or whole), the grammar that
forces calls, and /v1/chat/completions through the official openai SDK (parse and stream) on a
tiny random model with a template that renders tools; any model calls when it is forced."""
import json
import random
import shutil
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel
from service_helpers import API_KEY, NO_ENCODER, TINY_ARGS, shared_server, sse_events

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.tokenizer import Tokenizer
from service.schemas import ChatMessage, NamedToolChoice, Tool
from service.tools import SYSTEM_PROMPT, ToolCallParser, forced_calls, message_of, render_messages

TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>"
    "<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- for c in m.tool_calls or [] %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
    "{%- if m.role == 'tool' %} ({{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Weather(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    unit: Literal["C", "F"]


class Alarm(BaseModel):
    hour: int
    label: Literal["wake", "tea"]


WEATHER = openai.pydantic_function_tool(Weather, name="get_weather")
ALARM = openai.pydantic_function_tool(Alarm, name="set_alarm")
ALARM["function"]["parameters"]["properties"]["hour"].update(minimum=0, maximum=23)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'


# -- reading calls -------------------------------------------------------------------------------

def read(text: str, pieces: list[int] | None = None) -> tuple[str, list[tuple[str, str]], list]:
    """Feed text in pieces (cut at these lengths); (content, [(name, arguments)], events)."""
    parser, events, at = ToolCallParser(), [], 0
    for size in pieces or [len(text)]:
        events += parser.feed(text[at: at + size])
        at += size
    events += parser.feed(text[at:]) + parser.finish()
    streamed = {}
    for e in events:
        if e.kind == "call":
            streamed[e.index] = [e.text, ""]
        elif e.kind == "arguments":
            streamed[e.index][1] += e.text
    calls = [(c.name, c.arguments) for c in parser.calls]
    assert [tuple(v) for _, v in sorted(streamed.items())] == calls        # deltas add up to the calls
    assert "".join(e.text for e in events if e.kind == "content") == parser.content
    return parser.content, calls, events


@pytest.mark.parametrize("text, content, calls", [
    (CALL, "", [("get_weather", '{"city": "Paris", "unit": "C"}')]),
    ("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Rome"), "Let me check.",
     [("get_weather", '{"city": "Paris", "unit": "C"}'), ("get_weather", '{"city": "Rome", "unit": "C"}')]),
    ('<tool_call>{"arguments": {"a": [1, "}"]}, "name": "f"}</tool_call>', "", [("f", '{"a": [1, "}"]}')]),
    ('<tool_call>\n{"name": "f", "arguments": {"s": "a\\"}b"}}\n</tool_call> done', " done",
     [("f", '{"s": "a\\"}b"}')]),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("A plain answer ending in <tool", "A plain answer ending in <tool", []),
    ("Trailing space kept when nothing is called  ", "Trailing space kept when nothing is called  ", []),
])
def test_reading_calls_in_any_pieces_gives_the_same_answer(text, content, calls):
    whole = read(text)
    assert whole[:2] == (content, calls)
    rng = random.Random(0)
    for _ in range(20):
        assert read(text, [rng.randrange(1, 6) for _ in range(len(text))])[:2] == (content, calls)
    assert read(text, [1] * len(text))[:2] == (content, calls)


def test_a_canonical_call_streams_its_arguments_as_they_come():
    _, _, events = read(CALL, [1] * len(CALL))
    kinds = [e.kind for e in events]
    assert kinds[0] == "call" and events[0].text == "get_weather" and events[0].id.startswith("call_")
    assert kinds.count("arguments") > 10                        # fragments, not one piece at the end


def test_a_call_cut_short_by_max_tokens():
    cut = CALL.index("Paris") + 2
    content, calls, _ = read(CALL[:cut])
    assert content == "" and calls == [("get_weather", '{"city": "Pa')]
    assert message_of("no calls here", tools_active=False) == ("no calls here", None)
    text, listed = message_of("Hi " + CALL, tools_active=True)
    assert text == "Hi" and listed[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}


# -- forcing calls -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(str(tiny_llama), EngineConfig(num_kv_blocks=4096, block_size=4, max_num_seqs=64))


@pytest.mark.parametrize("choice, parallel", [("required", False), ("required", True), ("named", False)])
def test_forced_calls_parse_and_follow_their_schemas(engine, choice, parallel):
    tools = [Tool.model_validate(WEATHER), Tool.model_validate(ALARM)]
    picked = NamedToolChoice.model_validate({"type": "function", "function": {"name": "set_alarm"}}) \
        if choice == "named" else choice
    spec = forced_calls(tools, picked, parallel)
    schemas = {t.function.name: t.function.parameters for t in tools}
    for i in range(20):
        engine.add_request(f"{choice}{parallel}{i}", [5, 6, 7 + i], SamplingParams(
            max_tokens=400, temperature=1.0, seed=i, guided_decoding=spec))
    outs = []
    while engine.has_unfinished_requests():
        outs += [out for out in engine.step() if out.finished]
    counts = set()
    for out in outs:
        content, calls = message_of(out.text, tools_active=True)
        assert out.finish_reason == "stop" and content is None and calls, out.text
        counts.add(len(calls))
        for call in calls:
            assert choice != "named" or call["function"]["name"] == "set_alarm"
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    if not parallel:
        assert counts == {1}


def test_templates_that_know_no_tools_are_told_of_them():
    tools = [Tool.model_validate(WEATHER)]
    messages = [ChatMessage(role="user", content="Weather in Paris?"),
                ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": "Paris", "unit": "C"}'}}]}),
                ChatMessage(role="tool", content="22", tool_call_id="call_1")]
    plain = render_messages(messages, tools, "{{ messages }}")
    assert plain[0]["role"] == "system" and plain[0]["content"].startswith(SYSTEM_PROMPT.split("\n")[0])
    assert '"name": "get_weather"' in plain[0]["content"]
    assert plain[2]["content"] == CALL and "tool_calls" not in plain[2]
    assert plain[3] == {"role": "tool", "content": "22", "tool_call_id": "call_1"}
    aware = render_messages(messages, tools, TOOLS_TEMPLATE)
    assert aware[0]["role"] == "user" and aware[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "C"}


# -- over HTTP, through the openai SDK ------------------------------------------------------------

@pytest.fixture(scope="module")
def tools_model(tiny_llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tools") / "llama"
    shutil.copytree(tiny_llama, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def server(request, tools_model):
    return shared_server(request, "tools", ["--model", str(tools_model), *TINY_ARGS, *NO_ENCODER], api_key=API_KEY)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


ASK = [{"role": "user", "content": "What is the weather in Paris? And wake me at 7."}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_forced_calls_parse_in_the_sdk(client, tool_choice):
    choice = NAMED if tool_choice == "named" else "required"
    for seed in range(3):
        out = client.chat.completions.parse(model="tiny", messages=ASK, tools=[WEATHER, ALARM], tool_choice=choice,
                                            parallel_tool_calls=False, seed=seed, max_tokens=300)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.content is None
        (call,) = message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        expected = Weather if call.function.name == "get_weather" else Alarm
        assert isinstance(call.function.parsed_arguments, expected)
        assert tool_choice == "required" or call.function.name == "get_weather"


@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_forced_calls_stream_in_openais_shape(client, tool_choice):
    choice = NAMED if tool_choice == "named" else "required"
    with client.chat.completions.stream(model="tiny", messages=ASK, tools=[WEATHER, ALARM], tool_choice=choice,
                                        parallel_tool_calls=False, seed=4, max_tokens=300) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Weather if call.function.name == "get_weather" else Alarm)
    deltas = [tc for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or []]
    first, rest = deltas[0], deltas[1:]
    assert first.id == call.id and first.function.name == call.function.name and first.type == "function"
    assert len(rest) > 3 and all(d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]


def test_required_with_parallel_calls(client):
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, ALARM], tool_choice="required",
                                         seed=1, max_tokens=400, n=3)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) >= 1
        assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
        for call in choice.message.tool_calls:
            (Weather if call.function.name == "get_weather" else Alarm).model_validate_json(call.function.arguments)


def test_auto_reads_the_models_own_calls_streamed_and_not(client):
    # What the model writes under tool_choice auto is read for calls; a regex makes this random
    # model write one (after a sentence), as a model taught by its template would.
    regex = "Checking\\.\n" + CALL.replace(".", "\\.").replace("{", "\\{").replace("}", "\\}")
    body = dict(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=200, extra_body={"guided_regex": regex})
    out = client.chat.completions.create(**body)
    message = out.choices[0].message
    assert message.content == "Checking." and out.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == \
        [("get_weather", '{"city": "Paris", "unit": "C"}')]
    chunks = list(client.chat.completions.create(**body, stream=True))
    content = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    calls = [tc for c in chunks for ch in c.choices for tc in ch.delta.tool_calls or []]
    assert content == "Checking." and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments for tc in calls) == '{"city": "Paris", "unit": "C"}'
    # tool_choice none: the tools are not offered and the text is not read for calls.
    none = client.chat.completions.create(**body, tool_choice="none")
    assert none.choices[0].message.content == "Checking.\n" + CALL and none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens < out.usage.prompt_tokens                      # no <tools> system turn


def test_auto_without_a_call_is_a_plain_answer(client):
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=8, seed=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content


def test_a_tool_result_round_trip_renders_through_the_template(client, tools_model):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice=NAMED,
                                           seed=2, max_tokens=300)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "22 degrees"}]
    second = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=4,
                                            extra_body={"ignore_eos": True})
    assert second.choices[0].message.content
    tokenizer = Tokenizer.from_dir(tools_model)
    rendered = tokenizer.apply_chat_template(
        [ASK[0], {"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "content": "22 degrees", "tool_call_id": call.id}], tools=[WEATHER])
    assert f"22 degrees ({call.id})" in rendered and '"arguments": {"city": ' in rendered
    assert second.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_raw_stream_events(server):
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": NAMED, "seed": 3, "max_tokens": 300,
            "stream": True}
    with server.client() as http:
        with http.stream("POST", "/v1/chat/completions", json=body, timeout=60) as r:
            events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    first = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert set(first) == {"index", "id", "type", "function"} and first["function"]["arguments"] == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
