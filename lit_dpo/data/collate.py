"""Tokenized rows -> batches: padded or packed (prompt, completion) sequences, pairs stacked so
that one forward pass serves both sides, and a sampler that groups rows of similar length."""

from __future__ import annotations

import math
from collections.abc import Sequence

import datasets
import torch
from torch.utils.data import DistributedSampler

from lit_dpo.data.tokenize import ID_COLUMNS
from lit_dpo.logps import IGNORE_INDEX


def collate_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    packing: bool | str = False,
) -> dict[str, torch.Tensor | int]:
    """Batch N (prompt ids, completion ids) sequences, right-padded to the longest one.

    Returns `input_ids`, `attention_mask` and `labels`, each (N, T) int64. `labels` equal
    `input_ids` on completion tokens and IGNORE_INDEX on prompt and padding; they are not
    shifted (the log-prob code shifts).

    packing: the N sequences side by side instead, as few rows of the longest one's width as
    hold them all (first fit, longest first): `input_ids`, `labels`, `position_ids` (restarting
    at 0 for every sequence) and `row_ids` (which of the N sequences each token belongs to, -1
    on padding), each (R, T) with R <= N, and `n_rows` = N; no `attention_mask`. Attention
    stays within each sequence (transformers reads the restarts in `position_ids`), costs R T^2
    rather than (N T)^2 for one long row, and little compute goes to padding. packing="auto":
    packed when that saves at least one row (R < N), padded otherwise, where packing would
    only add its bookkeeping; the batch's keys say which.
    """
    sequences = [(list(p), list(c)) for p, c in sequences]
    lengths = [len(p) + len(c) for p, c in sequences]
    T = max(lengths)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of
    if packing:
        rows = pack_rows(lengths, width=T)
        if packing != "auto" or len(rows) < len(sequences):
            return _pack(sequences, rows, pad_token_id, width=T)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    labels = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, : n + m] = 1
        labels[i, n : n + m] = torch.tensor(completion, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(
    rows: list[dict[str, list[int]]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    packing: bool | str = False,
) -> dict[str, torch.Tensor]:
    """Stack B pairs into one batch of 2B rows, right-padded to the longest row.

    Returns `input_ids`, `attention_mask` and `labels`, each (2B, T) int64: rows 0..B-1 are
    prompt+chosen, rows B..2B-1 prompt+rejected, pair i in rows i and B+i, so one forward pass
    serves both. `labels` equal `input_ids` on completion tokens and IGNORE_INDEX on prompt and
    padding; they are not shifted (the log-prob code shifts). `index` (B,) holds each pair's
    row in its split, when the rows carry one. packing: the 2B sequences packed, as
    `collate_sequences` packs them.
    """
    sequences = [(r["prompt_input_ids"], r["chosen_input_ids"]) for r in rows]
    sequences += [(r["prompt_input_ids"], r["rejected_input_ids"]) for r in rows]
    batch = {}
    if "index" in rows[0]:
        batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    return batch | collate_sequences(sequences, pad_token_id, pad_to_multiple_of, packing)


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Sequences of these lengths -> rows of `width` tokens (at least the longest), as the
    sequence indices each row holds: first fit, longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([])
            room.append(width)
            fit = len(rows) - 1
        rows[fit].append(i)
        room[fit] -= lengths[i]
    return rows


def _pack(
    sequences: list[tuple[list[int], list[int]]],
    rows: list[list[int]],
    pad_token_id: int,
    width: int,
) -> dict[str, torch.Tensor | int]:
    """(prompt, completion) sequences laid out in `rows` (from `pack_rows`), each row's padding
    a segment of its own."""
    lengths = [len(p) + len(c) for p, c in sequences]
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    row_ids = torch.full(shape, -1, dtype=torch.long)  # -1: padding
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            (prompt, completion), n = sequences[i], lengths[i]
            input_ids[r, at : at + n] = torch.tensor(prompt + completion)
            labels[r, at + len(prompt) : at + n] = torch.tensor(completion)
            position_ids[r, at : at + n] = torch.arange(n)
            row_ids[r, at : at + n] = i
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # padding: a segment that restarts
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "row_ids": row_ids,
        "n_rows": len(sequences),
    }


class LengthGroupedSampler(DistributedSampler):
    """DistributedSampler's seeded shuffle, then each run of `group` indices (of this rank's
    share) ordered longest first, so that batches hold rows of similar length."""

    def __init__(self, dataset: datasets.Dataset, group: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.group = group
        self.lengths = [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(*(dataset[c] for c in ID_COLUMNS), strict=True)
        ]

    def __iter__(self):
        indices = list(super().__iter__())
        for i in range(0, len(indices), self.group):
            yield from sorted(indices[i : i + self.group], key=lambda j: -self.lengths[j])
