"""A chat template that refuses a conversation is the caller's mistake, said with the message it refused.

Templates refuse with ``raise_exception`` (Gemma 2: "System role not supported", most: "Conversation
roles must alternate …"), or fail on a value they cannot render. The template says why, not where:
``first_refused_message`` renders longer and longer prefixes of the conversation until one fails,
which finds the message that broke it (the system message, the second user turn in a row). Only
called after a render failed, so a conversation that renders costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from afina.core.errors import InvalidRequest

TEMPLATE_REFUSED_CODE = "chat_template_error"
MAX_PREFIX_RENDERS = 512  # past this many messages the index is not searched for (the reason is still given)


def first_refused_message(render: Callable[[list[dict[str, Any]]], object],
                          messages: Sequence[dict[str, Any]]) -> int | None:
    """The index of the first message whose prefix ``render`` refuses, or None when no prefix fails alone."""
    if len(messages) > MAX_PREFIX_RENDERS:
        return None
    for end in range(1, len(messages) + 1):
        try:
            render(list(messages[:end]))
        except Exception:  # noqa: BLE001 - whatever the template raised, this prefix is where it starts
            return end - 1
    return None


def refused_where(index: int | None, param: str = "messages") -> str:
    """``messages[2]`` (or ``messages`` when the index is unknown)."""
    return f"{param}[{index}]" if index is not None else param


def template_refusal(reason: str, index: int | None, param: str = "messages") -> InvalidRequest:
    """The 400 for a conversation the model's chat template refused."""
    where = refused_where(index, param)
    return InvalidRequest(f"the model's chat template refused {where}: {reason}", param=where,
                          code=TEMPLATE_REFUSED_CODE)
