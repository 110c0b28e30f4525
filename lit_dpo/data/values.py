"""What one field of a row may hold: a usable string, or a usable list of {role, content}
messages, and the words for what is wrong with it (each naming the field).

The ground floor of the row formats (`formats` builds on it); imports nothing from the rest of
`lit_dpo.data`.
"""

from __future__ import annotations

from typing import Any, Literal

ROLES = ("system", "developer", "user", "assistant", "tool")

# What a field holds: "prompt", "answer" (the assistant's turn after a separate prompt) or
# "whole" (a conversation that ends with the answer).
Part = Literal["prompt", "answer", "whole"]


def field_problem(value: Any, field: str, part: Part, chat: bool) -> str | None:
    """Why one field's value cannot be trained on; None if it can.

    `field`: the field's name as messages quote it ("'chosen'"); `part`: what it holds;
    `chat`: the split's rows are message lists (its first row decided), not strings.
    """
    if value is None:
        return f"{field} is null or missing"
    if chat and isinstance(value, str):
        return f"{field} is a string, but the split's first row is messages (mixed formats)"
    if not chat and isinstance(value, list):
        return f"{field} is a list of messages, but the split's first row is text (mixed formats)"
    return _message_problem(value, field, part) if chat else text_problem(value, field)


def text_problem(value: Any, field: str) -> str | None:
    """Why a value cannot be trained on as text; None if it can."""
    if value is None:
        return f"{field} is null or missing"
    if not isinstance(value, str):
        return f"{field} must be a string, got {type(value).__name__}"
    if not value:
        return f"{field} is empty"
    return None if value.strip() else f"{field} is whitespace only"


def _message_problem(value: Any, field: str, part: Part) -> str | None:
    if not isinstance(value, list):
        return f"{field} must be a list of {{role, content}} messages, got {type(value).__name__}"
    if not value:
        return f"{field} is an empty list of messages"
    for message in value:
        if not isinstance(message, dict):
            kind = type(message).__name__
            return f"{field} must be a list of {{role, content}} messages, got a list of {kind}"
        if message.get("role") is None:
            # ShareGPT's {"from": "human", "value": ...} is the usual cause
            hint = (
                " (ShareGPT 'from'/'value'? rename to 'role'/'content')"
                if message.get("from") is not None
                else ""
            )
            return f"{field} has a message without a 'role'{hint}"
        if message["role"] not in ROLES:
            return (
                f"{field} has a message with unknown role {message['role']!r} "
                f"(known: {', '.join(ROLES)})"
            )
        if message.get("content") is None:
            return f"{field} has a message without 'content'"
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            return f"{field} has a message whose 'content' is {kind}, not a string"
    if part == "prompt":
        return (
            None if any(m["content"].strip() for m in value) else f"{field} has only empty messages"
        )
    if part == "answer" and value[0]["role"] != "assistant":
        return (
            f"{field} starts with a {value[0]['role']!r} message; it should hold only the "
            f"assistant's answer (is the prompt repeated in it?)"
        )
    if value[-1]["role"] != "assistant":
        return f"{field} ends with a {value[-1]['role']!r} message, not the assistant's"
    if not value[-1]["content"].strip():
        return f"{field} ends with an empty assistant message"
    return None
