"""Tool calling on /v1/chat/completions, in the Hermes format:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Hermes-2-Pro, Qwen2 / 2.5 / 3, SmolLM3 and the other templates that render `tools` this way
teach it; a template that never mentions `tools` gets the same instructions in a system
message (`render_messages`), so any model is told how to call.

- tool_choice "auto": the model answers in text or writes such blocks; `ToolCallParser` finds
  them (streamed or not), the rest of the text is the content.
- "required" and a named function: a Lark grammar (llguidance's dialect, %json embedding each
  function's parameter schema) forces the blocks, so any model calls, with valid arguments.

A call whose text starts `{"name": "...", "arguments": ` streams its arguments as they come
(OpenAI's shape: a first delta with id and name, then argument fragments); one written any
other way arrives whole when its block closes. Either way `arguments` is the model's own text
of the value, so a streamed call and an unstreamed one read the same.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.guided import JSON_WHITESPACE, GuidedDecoding
from service.schemas import ChatMessage, NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_PREFIX = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}

SYSTEM_PROMPT = """You may call one or more functions to help with the user's request. The functions are:
<tools>
{tools}
</tools>
To call a function, answer with one block per call, each a JSON object with its name and arguments:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>"""


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# -- the prompt --------------------------------------------------------------------------

def render_messages(messages: list[ChatMessage], tools: list[Tool] | None, template: str) -> list[dict]:
    """Messages as chat templates read them (transformers' convention: assistant tool_calls with
    arguments as a dict, tool results with their tool_call_id). For a template that does not
    know `tools` / `tool_calls`, the tools become a system message and the calls Hermes blocks."""
    knows_tools, knows_calls = "tools" in template, "tool_calls" in template
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": _as_object(c.function.arguments)}}
                     for c in m.tool_calls]
            if knows_calls:
                message["tool_calls"] = calls
            else:
                message["content"] = "\n".join([message["content"]] * bool(message["content"]) + [
                    f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']})}"
                    f"\n{CLOSE}" for c in calls])
        out.append(message)
    if tools and not knows_tools:
        listing = "\n".join(json.dumps(tool.model_dump(exclude_none=True, by_alias=True)["function"])
                            for tool in tools)
        instructions = SYSTEM_PROMPT.format(tools=listing)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + instructions}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out


def _as_object(arguments: str) -> Any:
    # Templates write arguments with `| tojson` and expect a mapping; text that is not JSON stays text.
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_tools(tools: list[Tool] | None) -> list[dict] | None:
    return [tool.model_dump(exclude_none=True, by_alias=True) for tool in tools] if tools else None


# -- forcing calls -------------------------------------------------------------------------

def forced_calls(tools: list[Tool], choice: str | NamedToolChoice, parallel: bool) -> GuidedDecoding:
    """The grammar of tool_choice "required" (one call or more; one if not parallel) or of a
    named function (exactly one call of it)."""
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
        parallel = False
    rules = []
    for i, tool in enumerate(tools):
        schema = dict(tool.function.parameters or _NO_PARAMETERS)
        schema["x-guidance"] = {"whitespace_pattern": JSON_WHITESPACE}
        head = json.dumps(f'{OPEN}\n{{"name": {json.dumps(tool.function.name)}, "arguments": ')
        rules.append(f"call_{i}: {head} args_{i} {json.dumps('}' + chr(10) + CLOSE)}\n"
                     f"args_{i}: %json {json.dumps(schema)}")
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return GuidedDecoding("grammar", "\n".join([start, f"call: {calls}", *rules]), param="tools")


# -- reading calls -------------------------------------------------------------------------

@dataclass
class Event:
    kind: str                     # "content", "call" (a new call: index, id, name), "arguments" (a fragment)
    text: str = ""
    index: int = 0
    id: str = ""


@dataclass
class _Call:
    index: int
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Text in, events out: content outside the blocks, and calls. feed() as text arrives,
    finish() at the end; `calls` holds every call so far."""

    calls: list[_Call] = field(default_factory=list)
    _text: str = ""               # held back: could be the start of OPEN, or whitespace before a call
    _block: str | None = None     # inside a block: its text so far
    _streaming: bool = False      # the block is in the canonical form and its arguments are streaming
    _value: "_ValueEnd | None" = None
    content: str = ""

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        while text:
            text = self._feed_block(text, events) if self._block is not None else self._feed_text(text, events)
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self._block is not None and not self._streaming:
            if not self._close_opaque(self._block, events):
                self._content(OPEN + self._block, events)
        elif self._block is None and (self._text.strip() or (self._text and not self.calls)):
            self._content(self._text, events)       # (trailing whitespace too, when nothing was called)
        self._block, self._text = None, ""
        return events

    # -- outside a block

    def _feed_text(self, text: str, events: list[Event]) -> str:
        buffered = self._text + text
        at = buffered.find(OPEN)
        if at != -1:
            if buffered[:at].strip():                           # (whitespace right before a call is not content)
                self._content(buffered[:at].rstrip(), events)
            self._text, self._block, self._streaming = "", "", False
            return buffered[at + len(OPEN):]
        keep = _partial_suffix(buffered, OPEN)
        head, tail = buffered[:len(buffered) - keep], buffered[len(buffered) - keep:]
        if head.strip():
            stripped = head.rstrip()
            self._content(stripped, events)
            self._text = head[len(stripped):] + tail       # trailing whitespace waits for what follows
        else:
            self._text = head + tail
        return ""

    def _content(self, text: str, events: list[Event]) -> None:
        self.content += text
        events.append(Event("content", text))

    # -- inside a block

    def _feed_block(self, text: str, events: list[Event]) -> str:
        if self._streaming:
            return self._feed_arguments(text, events)
        self._block += text
        match = _PREFIX.match(self._block)
        if match and len(self._block) > match.end():          # the value has begun
            name = json.loads(f'"{match.group(1)}"')
            call = _Call(len(self.calls), new_call_id(), name)
            self.calls.append(call)
            events.append(Event("call", name, call.index, call.id))
            self._streaming, self._value = True, _ValueEnd()
            rest, self._block = self._block[match.end():], ""
            return rest
        end = self._block.find(CLOSE)
        if end == -1:
            return ""
        block, rest = self._block[:end], self._block[end + len(CLOSE):]
        if not self._close_opaque(block, events):
            self._content(OPEN + block + CLOSE, events)
        self._block = None
        return rest

    def _feed_arguments(self, text: str, events: list[Event]) -> str:
        call = self.calls[-1]
        if self._value is not None:
            used = self._value.feed(text)
            if used:
                call.arguments += text[:used]
                events.append(Event("arguments", text[:used], call.index))
            if not self._value.done:
                return ""
            self._value, text = None, text[used:]
        self._block += text                                     # the rest of the block: wait for its end
        end = self._block.find(CLOSE)
        if end == -1:
            return ""
        rest = self._block[end + len(CLOSE):]
        self._block, self._streaming = None, False
        return rest

    def _close_opaque(self, block: str, events: list[Event]) -> bool:
        """A whole block not in the canonical form: a call if it parses as one."""
        try:
            parsed = json.loads(block)
        except ValueError:
            return False
        if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
            return False
        arguments = parsed.get("arguments", parsed.get("parameters", {}))
        call = _Call(len(self.calls), new_call_id(), parsed["name"],
                     arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False))
        self.calls.append(call)
        events += [Event("call", call.name, call.index, call.id), Event("arguments", call.arguments, call.index)]
        return True


class _ValueEnd:
    """Where a JSON value ends, fed a character run at a time (the text is the model's; the
    grammar made it valid when the call was forced)."""

    def __init__(self):
        self.depth, self.in_string, self.escaped, self.started, self.done = 0, False, False, False, False
        self.scalar = False

    def feed(self, text: str) -> int:
        """How many characters of text belong to the value (all, while it goes on)."""
        for i, ch in enumerate(text):
            if not self.started:
                if ch.isspace():
                    continue
                self.started = True
                if ch == '"':
                    self.in_string = True
                elif ch in "{[":
                    self.depth = 1
                else:
                    self.scalar = True
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
                continue
            if self.scalar:
                if ch in ",}] \t\r\n":
                    self.done = True
                    return i
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def message_of(text: str, tools_active: bool) -> tuple[str | None, list[dict] | None]:
    """A finished completion's text -> (content, tool_calls) as OpenAI's message has them."""
    if not tools_active:
        return text, None
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in parser.calls]
    return (parser.content or None) if calls else text, calls or None
