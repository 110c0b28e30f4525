"""Row formats: one class per format, and the registry that `detect_format` walks.

A format knows which columns claim a split for it, which fields a row needs (and what each one
holds), what stops a row from being trained on (each problem naming its field), and how a row
splits into a prompt and its completions. Text or chat (message lists, rendered with the
tokenizer's chat template) is not a format but a property of the split: its first usable row
decides, and a row of the other kind is reported as mixed formats.

Built in: `pair` (prompt/chosen/rejected), `implicit` (chosen/rejected whose shared beginning is
the prompt) and `completion` (prompt/completion, SFT rows, tokenized as chosen = rejected).
Adding a format is one class, registered:

    @register_format
    class QA(Format):
        name = "qa"
        fields = {"question": "prompt", "better": "answer", "worse": "answer"}
        summary = "question/better/worse"

        def row_problems(self, row, chat):
            return identical_problem(row, "better", "worse", chat)

        def split(self, row, chat):
            return row["question"], [row["better"], row["worse"]]
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import datasets
from transformers import PreTrainedTokenizerBase

ROLES = ("system", "developer", "user", "assistant", "tool")
_HH_TURN = "\n\nAssistant:"  # Anthropic-HH: the prompt ends where the last answer starts

# What a field holds: "prompt", "answer" (the assistant's turn after a separate prompt) or
# "whole" (a conversation that ends with the answer).
Part = Literal["prompt", "answer", "whole"]


class Format:
    """One row format. Subclass it, set the class attributes, implement `split` (and
    `row_problems` for checks across fields), and `register_format` it.

    Attributes:
        name: The format's name in `FORMATS`.
        fields: {column: what it holds} for every column a row needs, in order. Its columns that
            are not prompts claim a split for the format (see `recognises`); the first of them
            decides whether the split is text or messages.
        summary: The columns as an error message lists them ("prompt/chosen/rejected").
    """

    name: ClassVar[str]
    fields: ClassVar[dict[str, Part]]
    summary: ClassVar[str]

    @property
    def answers(self) -> list[str]:
        """The fields that are not prompts (completions or whole conversations)."""
        return [field for field, part in self.fields.items() if part != "prompt"]

    def recognises(self, columns: list[str]) -> bool:
        """Whether a split with these columns is of this format: it has one of `answers`. A
        missing field is then reported by name rather than making the split unrecognised."""
        return any(field in columns for field in self.answers)

    def problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        """What stops one row from being trained on, each problem naming its field; [] if nothing.

        `chat`: the split's rows are message lists (the first row decided); a row of the other
        kind is a mix of formats. Each field's value is checked first, then, if all are fine,
        `row_problems`.
        """
        found = [
            p
            for f, part in self.fields.items()
            if (p := field_problem(row[f], repr(f), part, chat))
        ]
        return found or self.row_problems(row, chat)

    def row_problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        """Problems across fields of a row whose every field holds a usable value."""
        return []

    def split(self, row: dict[str, Any], chat: bool) -> tuple[str | list, list]:
        """(prompt, completions) of a checked row: one completion, or (chosen, rejected)."""
        raise NotImplementedError


FORMATS: dict[str, Format] = {}  # tried in this order: the built-ins, then registered ones


def register_format(cls: type[Format]) -> type[Format]:
    """Add a format (a `Format` subclass) to `FORMATS`; usable as a class decorator. Formats are
    tried in the order they were registered, the built-ins first."""
    if cls.name in FORMATS:
        raise ValueError(f"a format named {cls.name!r} is already registered")
    FORMATS[cls.name] = cls()
    return cls


def identical_problem(row: dict[str, Any], first: str, second: str, chat: bool) -> list[str]:
    """[the problem] when two completions of a row are the same (completions lose trailing
    whitespace, so text differing only there is the same); else []."""
    a, b = row[first], row[second]
    if a == b or not chat and a.rstrip() == b.rstrip():
        return [f"{first!r} is identical to {second!r}"]
    return []


@register_format
class Pair(Format):
    """`prompt`, `chosen`, `rejected`: the standard preference pair."""

    name = "pair"
    fields = {"prompt": "prompt", "chosen": "answer", "rejected": "answer"}
    summary = "prompt/chosen/rejected"

    def recognises(self, columns: list[str]) -> bool:
        return "prompt" in columns and super().recognises(columns)

    def row_problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        return identical_problem(row, "chosen", "rejected", chat)

    def split(self, row: dict[str, Any], chat: bool) -> tuple[str | list, list]:
        return row["prompt"], [row["chosen"], row["rejected"]]


@register_format
class Implicit(Format):
    """`chosen`, `rejected` holding whole conversations (or texts); the prompt is their shared
    beginning."""

    name = "implicit"
    fields = {"chosen": "whole", "rejected": "whole"}
    summary = "chosen/rejected (implicit prompt)"

    def row_problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        """The completions differ, after a prompt both share."""
        if found := identical_problem(row, "chosen", "rejected", chat):
            return found
        prompt, (chosen, rejected) = self.split(row, chat)
        if not chat:
            if not prompt:
                return ["'chosen' and 'rejected' share no beginning to use as the prompt"]
            if not chosen.strip() or not rejected.strip():
                return ["'chosen' or 'rejected' has nothing after the prompt they share"]
            return []
        if not prompt:
            return ["'chosen' and 'rejected' share no prompt messages (different prompts)"]
        if not chosen or not rejected:
            return ["'chosen' or 'rejected' has no answer after the prompt they share"]
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            return [
                "'chosen' and 'rejected' differ before the assistant's answer (different prompts)"
            ]
        return []

    def split(self, row: dict[str, Any], chat: bool) -> tuple[str | list, list]:
        split = split_message_prompt if chat else split_text_prompt
        prompt, *completions = split(row["chosen"], row["rejected"])
        return prompt, completions


@register_format
class Completion(Format):
    """`prompt`, `completion`: SFT rows, no pair; tokenized as if chosen = rejected =
    completion, so batches keep their layout and an SFT step uses rows 0..B-1."""

    name = "completion"
    fields = {"prompt": "prompt", "completion": "answer"}
    summary = "prompt/completion"

    def split(self, row: dict[str, Any], chat: bool) -> tuple[str | list, list]:
        return row["prompt"], [row["completion"]]


def detect_format(
    dataset: datasets.Dataset, where: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[Format, bool]:
    """(format, chat) of a split, from its columns and its first row with a usable value.

    chat: the completions are message lists, rendered with the tokenizer's chat template (so it
    must have one), not strings.
    """
    columns = dataset.column_names
    fmt = next((f for f in FORMATS.values() if f.recognises(columns)), None)
    if fmt is None:
        claims = dict.fromkeys("/".join(map(repr, f.answers)) for f in FORMATS.values())
        raise ValueError(
            f"{where}: no {_either(list(claims))} column; found {columns}. Rows need "
            f"{_either([f.summary for f in FORMATS.values()])}"
        )
    for field in fmt.fields:
        if field not in columns:
            raise ValueError(f"{where}: missing column {field!r}; found {columns}")
    if len(dataset) == 0:
        raise ValueError(f"{where}: no rows")
    key = fmt.answers[0]
    for batch in dataset.select_columns([key]).iter(batch_size=1000):
        value = next((v for v in batch[key] if isinstance(v, str | list)), None)
        if value is not None:
            break
    chat = isinstance(value, list)  # no usable value at all: text, and every row says why
    if chat and not tokenizer.chat_template:
        raise ValueError(f"{where}: rows are conversational but the tokenizer has no chat template")
    return fmt, chat


def _either(items: list[str]) -> str:
    """Join as "a, b or c"."""
    return " or ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


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
    return _message_problem(value, field, part) if chat else _text_problem(value, field)


def _text_problem(value: Any, field: str) -> str | None:
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


def split_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) from two strings that start alike.

    The prompt is their common prefix, cut back to the end of the last Anthropic-HH
    "\\n\\nAssistant:" turn it holds, else to a word boundary (so neither completion starts
    mid-word or is empty); the space before the cut goes to the completions, as a BPE
    tokenizer would attach it to the next word.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prefix = chosen[:n]
    if _HH_TURN in prefix:
        n = prefix.rindex(_HH_TURN) + len(_HH_TURN)
    else:
        while n > 0 and not prefix[n - 1].isspace():  # drop the last, possibly partial, word
            n -= 1
        while n > 0 and prefix[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def split_message_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) messages: the prompt is the leading messages both share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]
