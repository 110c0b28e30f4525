"""Rows under other column names: a format read through a `columns` mapping, and which-is-better
labels.

`columns` maps the fields of the row formats to the user's column names, e.g. StackExchange-paired
`{prompt: question, chosen: response_j, rejected: response_k}`. The split's format is detected as
if the columns had our names; it is then read through `Mapped`, which reads the user's columns
and names them in every message. Other columns are ignored, as always.

`label` names a column saying which of the two answers is better, for layouts that store two
answers and a verdict: 1 (or true) means the `chosen` column's answer is the better one, 0 (or
false) the `rejected` column's (the pair is swapped for that row). SHP:
`{prompt: history, chosen: human_ref_A, rejected: human_ref_B, label: labels}` (labels is 1
when A is preferred); PKU-SafeRLHF: `{chosen: response_1, rejected: response_0, label:
better_response_id}` (better_response_id is 1 when response_1 is better).
"""

from __future__ import annotations

import re
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from lit_dpo.data.formats import FORMATS, Format, detect_format
from lit_dpo.data.values import label_problem, label_value

LABEL = "label"  # the `columns` key naming a which-is-better column


class Mapped(Format):
    """`inner` (a detected format) read from the user's columns: `columns` maps inner's fields
    (and `label`) to them. Problems name the user's columns."""

    def __init__(self, inner: Format, columns: dict[str, str]) -> None:
        self.inner = inner
        self.columns = {ours: columns.get(ours, ours) for ours in inner.fields}
        self.label = columns.get(LABEL)
        self.name = inner.name
        self.fields = {self.columns[f]: part for f, part in inner.fields.items()}
        if self.label is not None:
            self.fields[self.label] = "label"
        self.summary = "/".join(self.columns[f] for f in inner.fields)

    def _ours(self, row: dict[str, Any]) -> dict[str, Any]:
        return {ours: row[theirs] for ours, theirs in self.columns.items()}

    def problems(self, row: dict[str, Any], chat: bool) -> list[str]:
        found = [
            in_their_names(p, self.columns) for p in self.inner.problems(self._ours(row), chat)
        ]
        if self.label is not None and (problem := label_problem(row[self.label], repr(self.label))):
            found.insert(0, problem)
        return found

    def split(self, row: dict[str, Any], chat: bool) -> tuple[str | list, list]:
        prompt, completions = self.inner.split(self._ours(row), chat)
        if self.label is not None and not label_value(row[self.label]):
            completions = completions[::-1]  # the `rejected` column holds the better answer
        return prompt, completions


def detect(
    dataset: datasets.Dataset,
    where: str,
    tokenizer: PreTrainedTokenizerBase,
    columns: dict[str, str] | None = None,
) -> tuple[Format, bool]:
    """`detect_format`, through a `columns` mapping when given (see the module)."""
    if not columns:
        return detect_format(dataset, where, tokenizer)
    check_columns(columns)
    found = dataset.column_names
    for ours, theirs in columns.items():
        if theirs not in found:
            raise ValueError(
                f"{where}: columns maps {ours!r} to {theirs!r}: no such column; found {found}"
            )
    renamed = {theirs: ours for ours, theirs in columns.items() if ours != LABEL}
    # our names for the mapped columns; a column already under one of our names gives way
    keep = [c for c in found if c in renamed or c not in renamed.values()]
    view = dataset.select_columns(keep).rename_columns(
        {theirs: ours for theirs, ours in renamed.items() if theirs != ours}
    )
    try:
        inner, chat = detect_format(view, where, tokenizer)
    except ValueError as err:
        ours = {k: v for k, v in columns.items() if k != LABEL}
        raise ValueError(in_their_names(str(err), ours)) from None
    mapped = Mapped(inner, columns)
    if mapped.label is not None and not inner.pairs:
        raise ValueError(
            f"{where}: columns: {LABEL!r} ({mapped.label!r}) says which of two answers is "
            f"better, but the split holds {inner.summary} rows"
        )
    return mapped, chat


def check_columns(columns: dict[str, str]) -> None:
    """Refuse a `columns` mapping that names an unknown field or maps two fields to one column."""
    known = {f for fmt in FORMATS.values() for f in fmt.fields} | {LABEL}
    for ours, theirs in columns.items():
        if ours not in known:
            raise ValueError(
                f"columns: unknown field {ours!r}; map the row formats' fields "
                f"({', '.join(sorted(known - {LABEL}))}) or {LABEL!r} to your column names"
            )
        if not isinstance(theirs, str):
            raise ValueError(f"columns: {ours!r} must map to a column name, got {theirs!r}")
    doubled = {theirs for theirs in columns.values() if list(columns.values()).count(theirs) > 1}
    if doubled:
        raise ValueError(f"columns: {sorted(doubled)} mapped to more than one field")


def in_their_names(message: str, columns: dict[str, str]) -> str:
    """A message quoting our field names ("'chosen'"), quoting the user's columns instead (one
    pass, so a mapping that swaps two names stays right)."""
    by_quote = {repr(ours): repr(theirs) for ours, theirs in columns.items() if ours != theirs}
    if not by_quote:
        return message
    quoted = re.compile("|".join(re.escape(q) for q in sorted(by_quote, key=len, reverse=True)))
    return quoted.sub(lambda m: by_quote[m.group()], message)
