"""What one field of a row may hold: a usable string, or a usable list of {role, content}
messages, and the words for what is wrong with it (each naming the field).

The ground floor of the row formats (`formats` builds on it); imports nothing from the rest of
`lit_dpo.data`.
"""

from __future__ import annotations

from typing import Any, Literal

ROLES = ("system", "developer", "user", "assistant", "tool")

# What a field holds: "prompt", "answer" (the assistant's turn after a separate prompt),
# "whole" (a conversation that ends with the answer) or "label" (which of two answers is better:
# 1/true the first, 0/false the second; see `columns`).
Part = Literal["prompt", "answer", "whole", "label"]
_LABELS = {"1": True, "true": True, "0": False, "false": False}


def field_problem(
    value: Any, field: str, part: Part, chat: bool, empty_ok: bool = False
) -> str | None:
    """Why one field's value cannot be trained on; None if it can.

    `field`: the field's name as messages quote it ("'chosen'"); `part`: what it holds;
    `chat`: the split's rows are message lists (its first row decided), not strings;
    `empty_ok`: an answer may say nothing (blank text, or an empty last assistant message), as
    one side of a preference pair may: "saying nothing is better" is a preference too.
    """
    if value is None:
        return f"{field} is null or missing"
    if part == "label":
        return label_problem(value, field)
    if chat and isinstance(value, str):
        return f"{field} is a string, but the split's first row is messages (mixed formats)"
    if not chat and isinstance(value, list):
        return f"{field} is a list of messages, but the split's first row is text (mixed formats)"
    if chat:
        return _message_problem(value, field, part, empty_ok)
    if empty_ok and part == "answer" and isinstance(value, str):
        return None
    return text_problem(value, field)


def is_empty(completion: str | list) -> bool:
    """Whether a completion says nothing: blank text, or messages whose contents are all blank."""
    if isinstance(completion, str):
        return not completion.strip()
    return isinstance(completion, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip()
        for m in completion
    )


def label_value(value: Any) -> bool | None:
    """A which-is-better label as a bool (True: the first answer is better); None if it is no
    label: 1/0, true/false, or those words as text (CSV cells)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    return _LABELS.get(value.strip().lower()) if isinstance(value, str) else None


def label_problem(value: Any, field: str) -> str | None:
    if value is None:
        return f"{field} is null or missing"
    if label_value(value) is None:
        return f"{field} must be 1 or 0 (or true/false), got {value!r}"
    return None


def text_problem(value: Any, field: str) -> str | None:
    """Why a value cannot be trained on as text; None if it can."""
    if value is None:
        return f"{field} is null or missing"
    if not isinstance(value, str):
        return f"{field} must be a string, got {type(value).__name__}"
    if not value:
        return f"{field} is empty"
    return None if value.strip() else f"{field} is whitespace only"


def _message_problem(value: Any, field: str, part: Part, empty_ok: bool) -> str | None:
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
    if not value[-1]["content"].strip() and not empty_ok:
        return f"{field} ends with an empty assistant message"
    return None
