"""Row formats: one class per format, and the registry that `detect_format` walks.

A format knows which columns claim a split for it, which fields a row needs (and what each one
holds, see `values`), what stops a row from being trained on (each problem naming its field),
and how a row splits into a prompt and its completions. Text or chat (message lists, rendered
with the tokenizer's chat template) is not a format but a property of the split: its first
usable row decides, and a row of the other kind is reported as mixed formats.

Built in: `conversation` (a prompt string and chosen/rejected whole conversations holding it, as
UltraFeedback-binarized ships them), `pair` (prompt/chosen/rejected), `implicit` (chosen/rejected
whose shared beginning is the prompt) and `completion` (prompt/completion, SFT rows, tokenized as
chosen = rejected). A prompt split is never guessed: implicit-prompt text is split only after an
Anthropic-HH "\\n\\nAssistant:" turn. Adding a format is one class, registered:

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

from typing import Any, ClassVar

import datasets
from transformers import PreTrainedTokenizerBase

from lit_dpo.data.values import Part, field_problem, is_empty, text_problem

_HH_TURN = "\n\nAssistant:"  # Anthropic-HH: the prompt ends where the last answer starts
_HH_HUMAN = "\n\nHuman:"
# Columns that hold the prompt in other datasets' schemas (Alpaca, SHP, ...)
PROMPT_LIKE = ("question", "instruction", "query", "input", "context", "history")


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
        """The fields that hold answers (completions or whole conversations)."""
        return [field for field, part in self.fields.items() if part in ("answer", "whole")]

    @property
    def pairs(self) -> bool:
        """Whether a row holds a preference pair (two answers), as DPO needs; a format of single
        completions (SFT rows) does not."""
        return len(self.answers) > 1

    def recognises(self, columns: list[str]) -> bool:
        """Whether a split with these columns is of this format: it has one of `answers`. A
        missing field is then reported by name rather than making the split unrecognised."""
        return any(field in columns for field in self.answers)

    def fits(self, row: dict[str, Any]) -> bool:
        """Whether the split's first usable row (all its columns) is of this format. Lets two
        formats with the same columns tell their rows apart: a split is of the first registered
        format that recognises its columns and fits its first row."""
        return True

    def split_problem(self, dataset: datasets.Dataset) -> str | None:
        """Why a split (its columns, their types) must not be read as this format, whatever
        each row holds; None if it may."""
        return None

    def problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        """What stops one row from being trained on, each problem naming its field; [] if nothing.

        `chat`: the split's rows are message lists (the first row decided); a row of the other
        kind is a mix of formats. Each field's value is checked first, then, if all are fine,
        `row_problems`. In a pair, one answer may be empty (EOS alone: "say nothing" preferred).
        """
        found = [
            p
            for f, part in self.fields.items()
            if (p := field_problem(row[f], repr(f), part, chat, empty_ok=self.pairs))
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
    whitespace, so text differing only there is the same; two empty answers are the same); else
    []."""
    a, b = row[first], row[second]
    if a == b or (not chat and a.rstrip() == b.rstrip()) or (is_empty(a) and is_empty(b)):
        return [f"{first!r} is identical to {second!r}"]
    return []


class Implicit(Format):
    """`chosen`, `rejected` holding whole conversations (or texts); the prompt is their shared
    beginning: the messages both share, or text up to the last Anthropic-HH "\\n\\nAssistant:"
    turn both share (anywhere else would be a guess, so other text is refused)."""

    name = "implicit"
    fields = {"chosen": "whole", "rejected": "whole"}
    summary = "chosen/rejected (implicit prompt)"

    def row_problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        """The completions differ, after a prompt both share."""
        if found := identical_problem(row, "chosen", "rejected", chat):
            return found
        prompt, (chosen, rejected) = self.split(row, chat)
        if not chat:
            return _text_prompt_problems(row["chosen"], row["rejected"], prompt, chosen, rejected)
        if not prompt:
            return ["'chosen' and 'rejected' share no prompt messages (different prompts)"]
        if not chosen or not rejected:
            return ["'chosen' or 'rejected' has no answer after the prompt they share"]
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            return [
                "'chosen' and 'rejected' differ before the assistant's answer (different prompts)"
            ]
        if is_empty(chosen) and is_empty(rejected):  # two silences: no preference
            return ["'chosen' is identical to 'rejected'"]
        return []

    def split(self, row: dict[str, Any], chat: bool) -> tuple[str | list, list]:
        split = split_message_prompt if chat else split_text_prompt
        prompt, *completions = split(row["chosen"], row["rejected"])
        return prompt, completions


def _text_prompt_problems(
    whole_chosen: str, whole_rejected: str, prompt: str, chosen: str, rejected: str
) -> list[str]:
    """What is wrong with the split of two texts into the prompt they share and two answers."""
    if not prompt:
        shared = _common_prefix(whole_chosen, whole_rejected)
        if not shared:
            return ["'chosen' and 'rejected' share no beginning to use as the prompt"]
        if _HH_HUMAN not in shared:
            return [
                "'chosen' and 'rejected' start alike but share no Anthropic-HH turn ending in "
                "'\\n\\nAssistant:', so where the prompt ends is unknown: give the prompt in a "
                "'prompt' column"
            ]
    if not prompt or _HH_HUMAN in chosen or _HH_HUMAN in rejected:
        return [
            "'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' turn "
            "(different prompts)"
        ]
    return []


@register_format
class Conversation(Implicit):
    """`prompt` (a string) and `chosen`, `rejected` holding whole conversations that include it,
    as UltraFeedback-binarized ships them (`HuggingFaceH4/ultrafeedback_binarized`, beside
    `prompt_id`, `messages`, `score_chosen`, `score_rejected`): the prompt is the messages both
    conversations share, and the `prompt` column must be the last user message among them."""

    name = "conversation"
    fields = {"prompt": "prompt", "chosen": "whole", "rejected": "whole"}
    summary = "prompt/chosen/rejected"

    def recognises(self, columns: list[str]) -> bool:
        return "prompt" in columns and super().recognises(columns)

    def fits(self, row: dict[str, Any]) -> bool:
        chosen = row.get("chosen")
        return (
            isinstance(row.get("prompt"), str)
            and isinstance(chosen, list)
            and any(isinstance(m, dict) and m.get("role") == "user" for m in chosen)
        )

    def problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        found = [text_problem(row["prompt"], "'prompt'")]
        found += [
            field_problem(row[f], repr(f), "whole", chat, empty_ok=True)
            for f in ("chosen", "rejected")
        ]
        return [p for p in found if p] or self.row_problems(row, chat)

    def row_problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        if found := super().row_problems(row, chat):
            return found
        prompt, _ = self.split(row, chat)
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if not users or users[-1].strip() != row["prompt"].strip():
            return ["'prompt' is not the last user message that 'chosen' and 'rejected' share"]
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
        if found := identical_problem(row, "chosen", "rejected", chat):
            return found
        # Both answers opening with the whole prompt (past a word or two, which an answer may
        # echo: "Hi" -> "Hi! ...") are transcripts that repeat it; trained so, the model would
        # learn to repeat every prompt (messages: see `values`, "starts with a 'user' message").
        prompt = row["prompt"].strip() if not chat else ""
        if len(prompt.split()) > 2 and all(
            row[f].lstrip().startswith(prompt) for f in ("chosen", "rejected")
        ):
            return [
                "'chosen' and 'rejected' both start with the whole 'prompt': strip it from them "
                "(or, for full Anthropic-HH transcripts, drop the 'prompt' column to read them "
                "as implicit-prompt rows)"
            ]
        return []

    def split(self, row: dict[str, Any], chat: bool) -> tuple[str | list, list]:
        return row["prompt"], [row["chosen"], row["rejected"]]


register_format(Implicit)  # after `pair`, whose columns it also recognises: order is priority


@register_format
class Completion(Format):
    """`prompt`, `completion`: SFT rows, no pair; tokenized as if chosen = rejected =
    completion, so batches keep their layout and an SFT step uses rows 0..B-1."""

    name = "completion"
    fields = {"prompt": "prompt", "completion": "answer"}
    summary = "prompt/completion"

    def split_problem(self, dataset: datasets.Dataset) -> str | None:
        """TRL's unpaired preference rows (KTO): a true/false `label` beside each completion.
        Neither DPO (no pair) nor SFT (it would learn the undesirable ones too) can use them."""
        if "label" not in dataset.column_names:
            return None
        labels = dataset.select_columns(["label"])[:100]["label"]
        if not all(isinstance(v, bool) or str(v).lower() in ("true", "false") for v in labels):
            return None  # a label of another kind (a category): not a preference
        return (
            "unpaired prompt/completion rows with a 'label' column (KTO-style): lit_dpo trains "
            "on pairs (prompt/chosen/rejected) with DPOModule or on completions with SFTModule; "
            "pair each prompt's desirable and undesirable completions as chosen and rejected, "
            "or keep only the desirable rows and drop 'label' for SFT"
        )

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
    candidates = [f for f in FORMATS.values() if f.recognises(columns)]
    if not candidates:
        claims = dict.fromkeys("/".join(map(repr, f.answers)) for f in FORMATS.values())
        summaries = dict.fromkeys(f.summary for f in FORMATS.values())
        raise ValueError(
            f"{where}: no {_either(list(claims))} column; found {columns}. Rows need "
            f"{_either(list(summaries))}, or columns naming yours (e.g. columns: {{prompt: "
            f"question, chosen: response_j, rejected: response_k}})"
        )
    fmt = candidates[0]
    for field in fmt.fields:
        if field not in columns:
            like = prompt_like(columns) if fmt.fields[field] == "prompt" else None
            hint = (
                f" ({like!r} looks like the prompt: rename it to {field!r}, or set columns: "
                f"{{{field}: {like}}})"
                if like
                else ""
            )
            raise ValueError(f"{where}: missing column {field!r}; found {columns}{hint}")
    if len(dataset) == 0:
        raise ValueError(f"{where}: no rows")
    key, first = fmt.answers[0], None
    for start in range(0, len(dataset), 1000):
        batch = dataset.select_columns([key])[start : start + 1000][key]
        found = next((i for i, v in enumerate(batch) if isinstance(v, str | list)), None)
        if found is not None:
            first = dataset[start + found]
            break
    if first is not None:
        fits = (f for f in candidates if all(c in columns for c in f.fields) and f.fits(first))
        fmt = next(fits, fmt)
    if problem := fmt.split_problem(dataset):
        raise ValueError(f"{where}: {problem}")
    chat = first is not None and isinstance(first[key], list)  # none usable: text, each row says
    if chat and not tokenizer.chat_template:
        raise ValueError(
            f"{where}: rows are conversational but the tokenizer has no chat template (set "
            f"chat_template: Jinja text, or a .jinja file)"
        )
    return fmt, chat


def prompt_like(columns: list[str]) -> str | None:
    """The first column whose name says it holds the prompt under another name, if any."""
    return next((c for c in columns if c.lower() in PROMPT_LIKE), None)


def _either(items: list[str]) -> str:
    """Join as "a, b or c"."""
    return " or ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def split_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) from two strings that start alike.

    The prompt is their common prefix up to the end of the last Anthropic-HH "\\n\\nAssistant:"
    turn it holds; without one, where the prompt ends is not known and the prompt is "" (the
    row is refused). The space after the turn goes to the completions, as a BPE tokenizer would
    attach it to the next word.
    """
    prefix = _common_prefix(chosen, rejected)
    n = prefix.rindex(_HH_TURN) + len(_HH_TURN) if _HH_TURN in prefix else 0
    return chosen[:n], chosen[n:], rejected[n:]


def split_message_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) messages: the prompt is the leading messages both share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]
