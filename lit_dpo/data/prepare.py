"""One split from rows to tokens: its format (through `columns`), its bad rows under
`on_bad_rows`, its token ids, and the counts the run reports (`PreferenceDataModule.stats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import datasets
from transformers import PreTrainedTokenizerBase

from lit_dpo.data.columns import detect
from lit_dpo.data.formats import prompt_like
from lit_dpo.data.tokenize import tokenize_rows
from lit_dpo.data.validation import (
    count_problems,
    find_bad_rows,
    problem_counts,
    refuse_bad_rows,
    rejected_rows,
)

COUNTS = ("rows", "skipped", "prompts_truncated", "completions_truncated", "empty_completions")


@dataclass
class Prepared:
    """A split, tokenized. `stats`: rows (before skipping) / skipped / prompts_truncated /
    completions_truncated and empty_completions (chosen and rejected counted separately) /
    problems ({problem: rows}); `rejects`: the skipped rows, as the rejects file holds them."""

    rows: datasets.Dataset
    format: str
    where: str
    stats: dict[str, Any]
    rejects: list[dict[str, Any]]


def prepare_split(
    dataset: datasets.Dataset,
    split: str,
    sources: list[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    columns: dict[str, str] | None,
    on_bad_rows: Literal["error", "skip"],
    max_length: int | None,
    max_prompt_length: int | None,
    keep_end: bool,
    num_proc: int | None = None,
) -> Prepared:
    """Detect, validate and tokenize one split, its bad rows handled by `on_bad_rows`."""
    where = f"{', '.join(sources)}: split {split!r}"
    fmt, chat = detect(dataset, where, tokenizer, columns)
    hint = None  # no prompt column, but one under another name: say so with the bad rows
    if "prompt" not in fmt.fields.values() and (like := prompt_like(dataset.column_names)):
        hint = f"column {like!r} looks like the prompt: rename it to 'prompt'"
    bad = find_bad_rows(dataset, fmt, chat, num_proc)
    refuse_bad_rows(bad, len(dataset), where, sources, on_bad_rows, hint)
    keep = [i for i in range(len(dataset)) if i not in bad]
    tokenized, counts, dropped = tokenize_rows(
        dataset.select(keep) if bad else dataset,
        tokenizer,
        where,
        fmt,
        chat,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        keep_end=keep_end,
        num_proc=num_proc,
    )
    bad |= {keep[i]: [problem] for i, problem in dropped.items()}  # by source row index
    refuse_bad_rows(bad, len(dataset), where, sources, on_bad_rows, hint)
    stats = {"rows": len(dataset), "skipped": len(bad)}
    stats |= {k: counts[k] for k in COUNTS[2:]} | {"problems": problem_counts(bad)}
    rejects = rejected_rows(dataset, split, sources, bad)
    return Prepared(tokenized, fmt.name, where, stats, rejects)


def summary(split: str, stats: dict[str, Any], rejects_path: Any) -> list[str]:
    """The log lines of a prepared split: its counts, and what was skipped."""
    s = stats
    lines = [
        f"{split}: {s['rows']} rows, {s['skipped']} skipped, {s['prompts_truncated']} prompts "
        f"truncated, {s['completions_truncated']} completions truncated, "
        f"{s['empty_completions']} empty completions (EOS only)"
    ]
    if s["skipped"]:
        lines.append(
            f"{split}: skipped {count_problems(s['problems'])}; each skipped row is in "
            f"{rejects_path} with its reasons"
        )
    return lines
