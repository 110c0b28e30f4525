"""Properties of tokenization and collation that hold for any text (hypothesis).

Random unicode prompts and completions (emoji, combining marks, zero-width and plain
whitespace, empty strings) and random length limits go through PreferenceDataModule and its
DataLoader with the tiny tokenizer. Rows that validation must refuse (a blank prompt, chosen
identical to rejected before or after truncation, both blank included, a repeated prompt) are
skipped; a blank answer is EOS alone. On every other row of the collated (2B, T) batch:

- the prompt's tokens (all of them, or their cut when the row is too long) start both rows;
- labels are IGNORE_INDEX exactly on the prompt and the padding, the input ids elsewhere;
- no row is longer than max_length;
- a completion that was not cut ends with EOS, its only EOS; a cut one has none and fills
  the row to max_length.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_dpo.data import IGNORE_INDEX, PreferenceDataModule

# "<" is left out: text could otherwise spell "</s>", which the tokenizer reads as EOS itself.
CHARACTER = st.characters(codec="utf-8", exclude_characters="<")
PIECE = st.sampled_from(["👍🏽", "e\u0301", "\u200b", "中文", " ", "  ", "\n", "\t", "\u00a0"])
TEXT = st.lists(st.one_of(CHARACTER, PIECE), max_size=12).map("".join)
ROWS = st.lists(
    st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}),
    min_size=1,
    max_size=4,
)
# (max_length, max_prompt_length) with room for a completion, so no row can be dropped
LIMITS = st.integers(2, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1)))


@pytest.fixture(scope="module")
def rejects(tmp_path_factory):
    return str(tmp_path_factory.mktemp("rejects") / "rejects.jsonl")


def usable(row: dict[str, str]) -> bool:
    """What validation must let through: a prompt that is not blank, completions that differ
    (they lose trailing whitespace, so two blank ones are the same; one may be blank: "say
    nothing" preferred), not both opening with a prompt of three words or more (a repeated
    prompt)."""
    prompt = row["prompt"].strip()
    repeated = len(prompt.split()) > 2 and all(
        row[k].lstrip().startswith(prompt) for k in ("chosen", "rejected")
    )
    different = row["chosen"].rstrip() != row["rejected"].rstrip()
    return bool(prompt) and different and not repeated


def tied(tokenizer, row: dict[str, str], max_length: int, max_prompt_length: int) -> bool:
    """Whether chosen and rejected are the same tokens once the row is cut to max_length (they
    differed only past it): a tie, refused like a bad row."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    eos = [tokenizer.eos_token_id]
    c, r = (
        tokenizer(row[k].rstrip(), add_special_tokens=False)["input_ids"] + eos
        for k in ("chosen", "rejected")
    )
    if len(prompt) + max(len(c), len(r)) > max_length:
        room = max_length - min(len(prompt), max_prompt_length)
        c, r = c[:room], r[:room]
    return c == r


@settings(max_examples=200, deadline=None)
@given(rows=ROWS, limits=LIMITS, keep_end=st.booleans())
def test_tokenized_pairs_keep_their_invariants(tokenizer, rejects, rows, limits, keep_end):
    max_length, max_prompt_length = limits
    data = datasets.Dataset.from_list(rows)
    dm = PreferenceDataModule(
        datasets.DatasetDict(train=data, validation=data),
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode="keep_end" if keep_end else "keep_start",
        eval_batch_size=len(rows),
        on_bad_rows="skip",
        rejects_path=rejects,
    )
    kept = [
        row
        for row in rows
        if usable(row) and not tied(tokenizer, row, max_length, max_prompt_length)
    ]
    if not kept:
        with pytest.raises(ValueError, match="no rows left to train on"):
            dm.setup("fit")
        return
    dm.setup("fit")
    assert dm.stats["validation"]["skipped"] == len(rows) - len(kept)
    batch = next(iter(dm.val_dataloader()))  # unshuffled: kept rows in order
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B, T = ids.shape[0] // 2, ids.shape[1]
    assert B == len(kept)
    eos = tokenizer.eos_token_id
    for i, row in enumerate(kept):
        prompt = tokenizer(row["prompt"])["input_ids"]
        n = len(dm.val_dataset[i]["prompt_input_ids"])
        for j, completion_text in ((i, row["chosen"]), (B + i, row["rejected"])):
            length = int(mask[j].sum())
            assert length <= max_length
            assert mask[j].tolist() == [1] * length + [0] * (T - length)
            # the prompt's tokens, or their cut, start the row, the same in both rows
            kept_prompt = ids[j, :n].tolist()
            assert kept_prompt == dm.val_dataset[i]["prompt_input_ids"]
            if n == len(prompt):
                assert kept_prompt == prompt
            elif keep_end:  # the leading BOS (if there is room beside it), then the last ones
                head = prompt[:1] if n > 1 else []
                assert kept_prompt == head + prompt[len(prompt) - n + len(head) :]
            else:
                assert kept_prompt == prompt[:n]
            # labels: ignored on prompt and padding, the tokens themselves elsewhere
            position = torch.arange(T)
            learned = (position >= n) & (mask[j] == 1)
            assert torch.equal(labels[j], torch.where(learned, ids[j], IGNORE_INDEX))
            # EOS once, at the end of an uncut completion; a cut one fills the row
            full = tokenizer(completion_text.rstrip(), add_special_tokens=False)["input_ids"]
            full.append(eos)
            completion = ids[j, n:length].tolist()
            assert completion == full[: len(completion)]
            if len(completion) == len(full):
                assert completion.count(eos) == 1 and completion[-1] == eos
            else:
                assert eos not in completion and length == max_length
