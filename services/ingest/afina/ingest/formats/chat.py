"""Chat-shaped formats to afina's canonical ``messages``: OpenAI, ShareGPT, Alpaca, prompt/completion.

Only the shape is converted here (names mapped, fields moved); role order, empty
content and text repairs are checked later on the ``Example`` (validation stage).
"""

from __future__ import annotations

from typing import Any

import orjson

from afina.ingest.formats.base import ConversionError, as_text, kind_of
from afina.ingest.sources.jsonl import nests_deeper_than, too_deep
from afina.ingest.sources.limits import MAX_JSON_DEPTH

Message = dict[str, Any]

# ShareGPT speaker names as the datasets in the wild write them
SHAREGPT_ROLES: dict[str, str] = {
    "human": "user", "user": "user", "usuario": "user", "usuário": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant", "bot": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "function_response": "tool", "ipython": "tool",
}
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})


def from_openai(record: dict[str, Any]) -> list[Message]:
    """``{"messages": [...]}``; a CSV/Parquet ``messages`` cell may hold the list as a JSON string."""
    return message_list(_maybe_json(record.get("messages"), "messages"), "messages")


def from_sharegpt(record: dict[str, Any]) -> list[Message]:
    """``{"conversations": [{"from": "human", "value": ...}, ...], "system"?: ...}``."""
    turns = _maybe_json(record.get("conversations"), "conversations")
    if not isinstance(turns, list):
        raise ConversionError("conversations", "not_a_list",
                              f"'conversations' must be an array of turns, got {kind_of(turns)}")
    messages: list[Message] = []
    system = as_text(record.get("system"))
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise ConversionError(where, "not_an_object", f"each turn must be an object, got {kind_of(turn)}")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).strip().lower()) if speaker is not None else None
        if role is None:
            raise ConversionError(f"{where}.from", "unknown_speaker",
                                  f"unknown speaker {speaker!r}; expected one of {sorted(set(SHAREGPT_ROLES))}")
        content = turn.get("value", turn.get("content"))
        messages.append({"role": role, "content": _content(content, f"{where}.value")})
    return messages


def from_alpaca(record: dict[str, Any]) -> list[Message]:
    """``instruction`` (+ ``input``) is the user turn, ``output`` the assistant's; ``history`` pairs come first."""
    instruction = as_text(record.get("instruction"))
    if instruction is None:
        raise ConversionError("instruction", "missing_field", "the record has no 'instruction'")
    output = as_text(record.get("output"))
    if output is None:
        raise ConversionError("output", "missing_field", "the record has no 'output' (the answer to learn)")
    extra = as_text(record.get("input"))
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages: list[Message] = []
    system = as_text(record.get("system"))
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ConversionError("history", "not_a_list", f"'history' must be an array of [question, answer] pairs, "
                                                       f"got {kind_of(history)}")
    for index, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ConversionError(f"history[{index}]", "invalid_history", "each history item must be a "
                                                                          "[question, answer] pair")
        messages.append({"role": "user", "content": as_text(pair[0]) or ""})
        messages.append({"role": "assistant", "content": as_text(pair[1]) or ""})
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": output})
    return messages


def from_prompt_completion(record: dict[str, Any]) -> list[Message]:
    """``prompt`` (a string, or a list of messages) then ``completion`` (a string, or messages)."""
    if "prompt" not in record:
        raise ConversionError("prompt", "missing_field", "the record has no 'prompt'")
    if "completion" not in record:
        raise ConversionError("completion", "missing_field", "the record has no 'completion' (the answer to learn)")
    prompt = _maybe_json_list(record["prompt"], "prompt")
    completion = _maybe_json_list(record["completion"], "completion")
    messages = message_list(prompt, "prompt") if isinstance(prompt, list) else \
        [{"role": "user", "content": _content(prompt, "prompt")}]
    if isinstance(completion, list):
        messages.extend(message_list(completion, "completion"))
    else:
        messages.append({"role": "assistant", "content": _content(completion, "completion")})
    return messages


def message_list(value: Any, field: str) -> list[Message]:
    """A list of message objects; content given as text parts is joined into one string.

    Clean messages are kept as they are (the reader made them for this row alone); others are copied.
    """
    if not isinstance(value, list):
        raise ConversionError(field, "not_a_list", f"'{field}' must be an array of messages, got {kind_of(value)}")
    messages: list[Message] = []
    for index, message in enumerate(value):
        if type(message) is dict and type(message.get("content")) is str and None not in message.values():
            messages.append(message)  # the common case, already clean: a fresh dict from the reader, kept
            continue
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise ConversionError(where, "not_an_object", f"each message must be an object, got {kind_of(message)}")
        # Parquet struct columns carry every key of every row, None where a row had none
        clean = {key: item for key, item in message.items() if item is not None or key == "content"}
        if "content" in clean:
            clean["content"] = _content(clean["content"], f"{where}.content", allow_none=True)
        messages.append(clean)
    return messages


def _content(value: Any, field: str, *, allow_none: bool = False) -> Any:
    if value is None:
        if allow_none:
            return None
        raise ConversionError(field, "missing_content", "the content is missing (null)")
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") in _TEXT_PART_TYPES:
                texts.append(as_text(part.get("text")) or "")
            else:
                kind = part.get("type") if isinstance(part, dict) else kind_of(part)
                raise ConversionError(f"{field}[{index}]", "unsupported_content",
                                      f"only text content can be trained; got a {kind!r} part")
        return "".join(texts)
    return as_text(value)


def _maybe_json(value: Any, field: str) -> Any:
    """A list stored as a JSON string (CSV cells, Parquet string columns) parsed; others as they are."""
    if isinstance(value, str | bytes):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ConversionError(field, "invalid_json", f"'{field}' holds text that is not valid JSON: {exc}") \
                from None
        _refuse_deep(parsed, field)
        return parsed
    return value


def _maybe_json_list(value: Any, field: str) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        if not isinstance(parsed, list):
            return value
        _refuse_deep(parsed, field)
        return parsed
    return value


def _refuse_deep(parsed: Any, field: str) -> None:
    """JSON text in a cell is parsed here, not by a reader: the readers' nesting cap is applied here too."""
    if nests_deeper_than(parsed, MAX_JSON_DEPTH):
        raise ConversionError(field, "json_too_deep", too_deep(f"the JSON text in '{field}'"))
