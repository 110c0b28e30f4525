"""PreferenceDataModule: exact token layouts, truncation, loading, errors and caching.

Token strings are those of the tiny BPE in conftest.py ("Ġ" marks a leading space). It prepends
BOS itself, and its chat template emits BOS and ends every turn with EOS, so both duplication
bugs (BOS twice, EOS twice) would show here.
"""

from __future__ import annotations

import json
import logging
import os

import datasets
import pytest
import torch

from conftest import build_tokenizer, write_jsonl
from lit_dpo.data import (
    IGNORE_INDEX,
    PreferenceDataModule,
    collate_pairs,
    fit_row,
    split_text_prompt,
)

PAIR = {"prompt": "The movie", "chosen": " was wonderful", "rejected": " was terrible"}
USER = [{"role": "user", "content": "Hi"}]
PARIS = [{"role": "assistant", "content": "Paris"}]
LYON = [{"role": "assistant", "content": "Lyon"}]


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(list(ids))


def built(dataset, tokenizer, **kwargs):
    """A module after prepare_data and setup, as the Trainer would leave it."""
    dm = PreferenceDataModule(dataset, tokenizer, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def only_row(dm, tokenizer):
    (row,) = dm.train_dataset
    return {k: tokens(tokenizer, v) for k, v in row.items() if k != "index"}


# ------------------------------------------------------------------------------- token layouts


def test_standard_row_layout(tokenizer):
    """BOS once (also when the text starts with it), EOS once (also when already there)."""
    rows = [
        PAIR,
        {"prompt": "<s>The movie", "chosen": " was wonderful</s>\n", "rejected": " was terrible"},
    ]
    dm = built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0)
    for row in dm.train_dataset:
        assert tokens(tokenizer, row["prompt_input_ids"]) == ["<s>", "The", "Ġmovie"]
        assert tokens(tokenizer, row["chosen_input_ids"]) == [
            *["Ġwas", "Ġw", "o", "nd", "er", "fu", "l"],
            "</s>",
        ]
        assert tokens(tokenizer, row["rejected_input_ids"]) == [
            *["Ġwas", "Ġt", "er", "ri", "bl", "e"],
            "</s>",
        ]


def test_conversational_row_layout(tokenizer):
    """The template's own BOS and EOS are kept and nothing is added to them."""
    rows = [{"prompt": USER, "chosen": PARIS, "rejected": LYON}]
    row = only_row(built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0), tokenizer)
    assert row == {
        "prompt_input_ids": ["<s>", "<|user|>", "H", "i", "</s>", "<|assistant|>"],
        "chosen_input_ids": ["Pa", "r", "is", "</s>"],
        "rejected_input_ids": ["L", "y", "o", "n", "</s>"],
    }


def test_implicit_prompt_hh_strings(tokenizer):
    """Anthropic-HH rows: the prompt ends at the last "Assistant:", the answer keeps its space."""
    hh = "\n\nHuman: Hi\n\nAssistant:"
    rows = [{"chosen": hh + " The cat", "rejected": hh + " The dog", "score": 3}]
    dm = built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0)
    (row,) = dm.train_dataset
    assert tokenizer.decode(row["prompt_input_ids"]) == "<s>" + hh
    assert tokens(tokenizer, row["prompt_input_ids"]).count("<s>") == 1
    assert tokenizer.decode(row["chosen_input_ids"]) == " The cat</s>"
    assert tokenizer.decode(row["rejected_input_ids"]) == " The dog</s>"


def test_implicit_prompt_messages(tokenizer):
    rows = [{"chosen": USER + PARIS, "rejected": USER + LYON}]
    row = only_row(built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0), tokenizer)
    assert row["prompt_input_ids"] == ["<s>", "<|user|>", "H", "i", "</s>", "<|assistant|>"]
    assert row["chosen_input_ids"] == ["Pa", "r", "is", "</s>"]


def test_completion_rows_are_pairs_of_the_completion_with_itself(tokenizer):
    """SFT rows (prompt, completion): chosen = rejected = completion, so the batch layout is a
    DPO batch's and rows 0..B-1 are the SFT rows."""
    rows = [
        {"prompt": "The movie", "completion": " was wonderful"},
        {"prompt": USER, "completion": PARIS},
    ]
    text, chat = (
        only_row(built(datasets.Dataset.from_list([row]), tokenizer, val_fraction=0), tokenizer)
        for row in rows
    )
    assert text == {
        "prompt_input_ids": ["<s>", "The", "Ġmovie"],
        "chosen_input_ids": ["Ġwas", "Ġw", "o", "nd", "er", "fu", "l", "</s>"],
        "rejected_input_ids": ["Ġwas", "Ġw", "o", "nd", "er", "fu", "l", "</s>"],
    }
    assert chat == {
        "prompt_input_ids": ["<s>", "<|user|>", "H", "i", "</s>", "<|assistant|>"],
        "chosen_input_ids": ["Pa", "r", "is", "</s>"],
        "rejected_input_ids": ["Pa", "r", "is", "</s>"],
    }


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        (
            "Q: a\n\nAssistant: The cat",
            "Q: a\n\nAssistant: The dog",
            ("Q: a\n\nAssistant:", " The cat", " The dog"),
        ),
        (  # several turns: the prompt ends after the last "Assistant:" both share
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: The cat",
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: The dog",
            ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", " The cat", " The dog"),
        ),
        # no Anthropic-HH turn: where the prompt ends would be a guess, so there is none (the
        # row is refused: tests/test_validation.py, "implicit-text-without-hh-turn")
        ("Say: the cat", "Say: the dog", ("", "Say: the cat", "Say: the dog")),
        ("Say: hi", "Say: hi there", ("", "Say: hi", "Say: hi there")),
    ],
)
def test_split_text_prompt(chosen, rejected, expected):
    assert split_text_prompt(chosen, rejected) == expected


def test_collated_batch_layout(tokenizer):
    """Rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected; labels hide prompt and padding."""
    rows = [
        {"prompt_input_ids": [1, 7], "chosen_input_ids": [8, 2], "rejected_input_ids": [9, 9, 2]},
        {"prompt_input_ids": [1], "chosen_input_ids": [5, 5, 5, 2], "rejected_input_ids": [6, 2]},
    ]
    batch = collate_pairs(rows, pad_token_id=0)
    P, X = 0, IGNORE_INDEX  # pad id, ignored label
    assert batch["input_ids"].tolist() == [
        [1, 7, 8, 2, P],
        [1, 5, 5, 5, 2],
        [1, 7, 9, 9, 2],
        [1, 6, 2, P, P],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [X, X, 8, 2, X],
        [X, 5, 5, 5, 2],
        [X, X, 9, 9, 2],
        [X, 6, 2, X, X],
    ]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_to_multiple_of():
    rows = [{"prompt_input_ids": [1, 7], "chosen_input_ids": [8, 2], "rejected_input_ids": [2]}]
    batch = collate_pairs(rows, pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum().item() == 4 + 3
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == 2 + 1


def test_dataloaders_batch_pairs_and_shuffle_seeded(tokenizer):
    rows = [{**PAIR, "prompt": f"The movie {i}"} for i in range(12)]
    data = datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows), validation=datasets.Dataset.from_list(rows[:3])
    )

    def first_batch(seed):
        dm = built(data, tokenizer, batch_size=4, eval_batch_size=3, seed=seed)
        return next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader())), dm

    train, val, dm = first_batch(seed=0)
    assert train["input_ids"].shape[0] == 8 and val["input_ids"].shape[0] == 6
    assert set(train) == {"input_ids", "attention_mask", "labels", "index"}
    assert val["index"].tolist() == [0, 1, 2]  # each pair's row in its split, in order
    assert torch.equal(first_batch(seed=0)[0]["input_ids"], train["input_ids"])
    assert not torch.equal(first_batch(seed=1)[0]["input_ids"], train["input_ids"])
    assert dm.test_dataloader() == []  # no test split: nothing to test on


def test_tokenizer_without_pad_token_pads_with_eos():
    tokenizer = build_tokenizer(pad=False)
    pairs = datasets.Dataset.from_list([PAIR, {**PAIR, "chosen": " was"}])
    dm = built(datasets.DatasetDict(train=pairs, validation=pairs), tokenizer, batch_size=2)
    batch = next(iter(dm.val_dataloader()))
    eos, short = tokenizer.eos_token_id, 1  # row 1: prompt + " was"
    padding = batch["attention_mask"][short] == 0
    assert padding.sum() > 0 and (batch["input_ids"][short][padding] == eos).all()
    assert (batch["labels"][short][padding] == IGNORE_INDEX).all()
    assert batch["labels"][short][~padding][-1] == eos  # the real EOS is still learned


def test_tokenizer_by_path(tiny_model_dir, tmp_path):
    dm = built(write_jsonl(tmp_path / "pairs.jsonl", [PAIR]), tiny_model_dir, val_fraction=0)
    assert dm.train_dataset[0]["prompt_input_ids"][0] == dm.tokenizer.bos_token_id


# ------------------------------------------------------------------------------------ truncation

PROMPT, CHOSEN, REJECTED = [1, 10, 11, 12, 13, 14], [20, 21, 2], [30, 2]


def test_truncate_prompt_keep_end_keeps_bos_and_last_tokens():
    assert fit_row(PROMPT, CHOSEN, REJECTED, 6, 3, keep_end=True, bos=1) == (
        [1, 13, 14],
        CHOSEN,
        REJECTED,
    )


def test_truncate_prompt_keep_start():
    assert fit_row(PROMPT, CHOSEN, REJECTED, 6, 3, keep_end=False, bos=1) == (
        [1, 10, 11],
        CHOSEN,
        REJECTED,
    )


def test_truncate_completions_to_room_left():
    """Prompt cut to 3, room 5 - 3 = 2: chosen loses its EOS, rejected already fits."""
    assert fit_row(PROMPT, CHOSEN, REJECTED, 5, 3, keep_end=True, bos=1) == (
        [1, 13, 14],
        [20, 21],
        REJECTED,
    )


def test_row_that_fits_is_untouched_and_no_room_is_dropped():
    assert fit_row(PROMPT, CHOSEN, REJECTED, 9, 3, keep_end=True, bos=1) == (
        PROMPT,
        CHOSEN,
        REJECTED,
    )
    assert fit_row(PROMPT, CHOSEN, REJECTED, 4, 4, keep_end=True, bos=1) is None


def test_truncation_counts(tokenizer, caplog):
    """Row 0 fits; row 1 has a long prompt; row 2 long completions; row 3 a prompt too long."""
    long_text = " the movie was wonderful" * 4  # 37 tokens with BOS
    rows = [
        PAIR,
        {**PAIR, "prompt": long_text},
        # differing early: differing only past max_length, they would tie (a bad row)
        {**PAIR, "chosen": long_text, "rejected": " indeed" + long_text},
        {**PAIR, "prompt": long_text},
    ]
    data = datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows[:3]), validation=datasets.Dataset.from_list(rows[2:])
    )
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    dm = built(data, tokenizer, max_length=12, max_prompt_length=4, truncation_mode="keep_start")
    assert "train: 3 rows, 0 skipped, 1 prompts truncated, 2 completions truncated" in caplog.text
    assert dm.stats["train"] == {
        "rows": 3,
        "skipped": 0,
        "prompts_truncated": 1,
        "completions_truncated": 2,
        "empty_completions": 0,
        "problems": {},
    }
    lengths = [len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) for r in dm.train_dataset]
    assert max(lengths) == 12
    long_prompt = dm.train_dataset[1]["prompt_input_ids"]
    assert long_prompt == tokenizer(long_text)["input_ids"][:4]  # keep_start


def test_prompt_without_room_is_a_bad_row(tokenizer, tmp_path):
    """max_prompt_length >= max_length: a prompt filling the row leaves no room; under skip the
    row goes to the rejects, the rest trains (under error: see test_validation.py)."""
    long_prompt = {**PAIR, "prompt": " the movie was wonderful" * 4}
    data = datasets.Dataset.from_list([PAIR, long_prompt, PAIR])
    rejects = tmp_path / "rejects.jsonl"
    dm = built(
        data,
        tokenizer,
        max_length=12,
        max_prompt_length=12,
        val_fraction=0,
        on_bad_rows="skip",
        rejects_path=str(rejects),
    )
    assert len(dm.train_dataset) == 2 and dm.stats["train"]["skipped"] == 1
    (reject,) = map(json.loads, rejects.read_text().splitlines())
    assert reject["row"] == 2 and reject["data"] == long_prompt
    assert reject["problems"] == [
        "prompt too long: no room for a completion within max_length=12 "
        "(prompts are cut to max_prompt_length=12 first)"
    ]


# -------------------------------------------------------------------------------------- loading


def write_json(path, rows):
    path.with_suffix(".json").write_text(json.dumps(rows))
    return str(path.with_suffix(".json"))


def write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(path.with_suffix(".parquet"))
    return str(path.with_suffix(".parquet"))


def write_csv(path, rows):
    datasets.Dataset.from_list(rows).to_csv(path.with_suffix(".csv"), index=False)
    return str(path.with_suffix(".csv"))


@pytest.mark.parametrize(
    "write",
    [
        write_jsonl,
        write_json,
        write_parquet,
        write_csv,
        lambda path, rows: datasets.Dataset.from_list(rows),
    ],
    ids=["jsonl", "json", "parquet", "csv", "in-memory"],
)
def test_single_source_holds_out_validation(write, tokenizer, tmp_path):
    rows = [{**PAIR, "prompt": f"The movie {i}", "score": i} for i in range(20)]
    source = write(tmp_path / "pairs.jsonl", rows)
    dm = built(source, tokenizer, val_fraction=0.25, seed=3)
    assert (len(dm.train_dataset), len(dm.val_dataset), dm.test_dataset) == (15, 5, None)
    assert dm.stats == {
        "train": {
            "rows": 20,
            "skipped": 0,
            "prompts_truncated": 0,
            "completions_truncated": 0,
            "empty_completions": 0,
            "problems": {},
        }
    }
    prompts = {tuple(r["prompt_input_ids"]) for r in [*dm.train_dataset, *dm.val_dataset]}
    assert len(prompts) == 20  # a split, not a sample: every row once
    again = built(source, tokenizer, val_fraction=0.25, seed=3)
    assert again.val_dataset["prompt_input_ids"] == dm.val_dataset["prompt_input_ids"]


def test_directory_of_split_files(tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [PAIR] * 6)
    write_jsonl(tmp_path / "validation.jsonl", [PAIR] * 2)
    write_jsonl(tmp_path / "test.jsonl", [PAIR] * 3)
    (tmp_path / "README.md").write_text("not data")
    dm = built(str(tmp_path), tokenizer)
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (6, 2, 3)
    assert next(iter(dm.test_dataloader()))["input_ids"].shape[0] == 2 * 3


def test_map_is_cached_across_prepare_data_and_setup(tokenizer, tmp_path):
    """prepare_data tokenizes once; setup (every rank) reads the same cache file; changing a
    truncation setting or the tokenizer gives a new fingerprint, hence a new file."""
    source = write_jsonl(tmp_path / "pairs.jsonl", [PAIR] * 4)
    first = PreferenceDataModule(source, tokenizer, val_fraction=0)
    first.prepare_data()
    dm = PreferenceDataModule(source, tokenizer, val_fraction=0)
    dm.setup("fit")
    (cache,) = {f["filename"] for f in dm.train_dataset.cache_files if "cache-" in f["filename"]}
    mtime = os.stat(cache).st_mtime_ns
    dm = built(source, tokenizer, val_fraction=0)
    assert cache in {f["filename"] for f in dm.train_dataset.cache_files}
    assert os.stat(cache).st_mtime_ns == mtime  # read, not rewritten
    assert dm.stats["train"]["rows"] == 4

    def cache_file(dm):
        return [f["filename"] for f in dm.train_dataset.cache_files if "cache-" in f["filename"]]

    assert cache_file(built(source, tokenizer, val_fraction=0, max_length=64)) != [cache]
    assert cache_file(built(source, build_tokenizer(pad=False), val_fraction=0)) != [cache]


def test_num_proc_tokenizes_in_processes(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", [PAIR] * 4)
    dm = built(source, tokenizer, val_fraction=0, num_proc=2)
    assert len(dm.train_dataset) == 4
