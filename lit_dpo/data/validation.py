"""The bad-row policy: find every row that cannot be trained on, then refuse or skip them.

Validation looks at every row before anything is tokenized and collects every problem it finds
(each row's format says what they are; docs/errors.md lists them, with the messages the user
sees). Bad rows are handled by the `on_bad_rows` policy: `error` stops with one message naming
the file, the split, the first bad rows (by line number for JSON Lines) and how many rows have
each problem; `skip` trains on the rest and writes each bad row, with its reasons, to a rejects
file.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow.compute as pc

from lit_dpo.data.files import SHOWN, row_labels
from lit_dpo.data.formats import Format
from lit_dpo.utils import atomic_write, finite_json

_CHECKED = datasets.Features({"problems": datasets.List(datasets.Value("string"))})


def find_bad_rows(
    dataset: datasets.Dataset, fmt: Format, chat: bool, num_proc: int | None = None
) -> dict[int, list[str]]:
    """{row index: its problems} for every row that cannot be trained on (see `Format.problems`).

    One `datasets.map` pass over every row (cached on disk for file-backed datasets, so
    `prepare_data` and `setup` check a file once).
    """
    checked = dataset.map(
        _check_batch,
        batched=True,
        input_columns=list(fmt.fields),
        remove_columns=dataset.column_names,
        features=_CHECKED,
        num_proc=num_proc,
        desc="Checking rows",
        fn_kwargs=dict(fmt=fmt, chat=chat),
    )
    problems = checked.with_format("arrow")["problems"]  # (rows,) lists; Arrow, as row-by-row
    bad = pc.indices_nonzero(pc.list_value_length(problems))  # Python is slow
    return dict(zip(bad.to_pylist(), problems.take(bad).to_pylist(), strict=True))


def _check_batch(*columns: list, fmt: Format, chat: bool) -> dict[str, list]:
    rows = (dict(zip(fmt.fields, values, strict=True)) for values in zip(*columns, strict=True))
    return {"problems": [fmt.problems(row, chat) for row in rows]}


def refuse_bad_rows(
    bad: dict[int, list[str]],
    n_rows: int,
    where: str,
    sources: list[str],
    on_bad_rows: Literal["error", "skip"],
    hint: str | None = None,
) -> None:
    """Stop, describing the bad rows, under on_bad_rows=error or when no row is left; `hint`, a
    line about the whole split (e.g. a column that looks like the prompt), goes before the end."""
    if not bad or (on_bad_rows == "skip" and len(bad) < n_rows):
        return
    labels = row_labels(sources, sorted(bad)[:SHOWN])
    if len(bad) == n_rows:
        then = "no rows left to train on"
    else:
        then = (
            "fix these rows, or set on_bad_rows: skip to train on the rest (the skipped rows "
            "are written, with their reasons, to a rejects file)"
        )
    hint = f"{hint}\n" if hint else ""
    raise ValueError(f"{describe_bad_rows(where, bad, n_rows, labels)}\n{hint}{then}")


def describe_bad_rows(
    where: str, bad: dict[int, list[str]], n_rows: int, labels: dict[int, str]
) -> str:
    """The first bad rows with their problems, then how many rows have each problem."""
    shown = sorted(bad)[:SHOWN]
    lines = [f"{where}: {len(bad)} of {n_rows} rows cannot be trained on:"]
    lines += [f"  {labels[i]}: {'; '.join(bad[i])}" for i in shown]
    if len(bad) > len(shown):
        lines.append(f"  ... {len(bad) - len(shown)} more rows")
    lines.append(f"  by problem: {count_problems(problem_counts(bad))}")
    return "\n".join(lines)


def problem_counts(bad: dict[int, list[str]]) -> dict[str, int]:
    """{problem: how many rows have it}."""
    return dict(Counter(p for problems in bad.values() for p in problems))


def count_problems(counts: dict[str, int]) -> str:
    """{problem: rows} -> "3 rows: 'chosen' is empty; 1 row: ...", the most common first."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return "; ".join(f"{n} row{'' if n == 1 else 's'}: {problem}" for problem, n in ranked)


def rejected_rows(
    dataset: datasets.Dataset, split: str, sources: list[str], bad: dict[int, list[str]]
) -> list[dict[str, Any]]:
    """One record per bad row, as the rejects file holds it: {"split", "row" (from 1), "where"
    ("line 5"), "problems", "data" (the row as read)}."""
    labels = row_labels(sources, bad)
    rows = dataset.select(sorted(bad)).to_list() if bad else []
    return [
        {"split": split, "row": i + 1, "where": labels[i], "problems": bad[i], "data": row}
        for i, row in zip(sorted(bad), rows, strict=True)
    ]


REJECT_KEYS = {"split", "row", "where", "problems", "data"}


def write_rejects(path: Path, rejects: list[dict[str, Any]]) -> None:
    """The rejects file: JSON Lines, one record of `rejected_rows` per line, replacing an earlier
    rejects file; any other file at `path` is refused, untouched."""
    if path.exists() and not _is_rejects_file(path):
        raise FileExistsError(
            f"{path} exists and is not a rejects file: choose another data.rejects_path"
        )
    lines = (finite_json(reject, ensure_ascii=False, default=str) + "\n" for reject in rejects)
    atomic_write(path, "".join(lines))


def _is_rejects_file(path: Path) -> bool:
    """Whether `path` holds only records as `write_rejects` writes them (or nothing)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return all(json.loads(line).keys() == REJECT_KEYS for line in lines)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
