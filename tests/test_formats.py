"""Row formats: each built-in one recognised from its columns, its checks naming the field, and
the extension recipe (a format defined here, registered, then trained on) followed once."""

from __future__ import annotations

import datasets
import pytest
import torch

from conftest import build_tokenizer, write_jsonl
from lit_dpo.data import (
    FORMATS,
    Format,
    PreferenceDataModule,
    collate_pairs,
    collate_sequences,
    detect_format,
    identical_problem,
    register_format,
    tokenize_completions,
)

USER = [{"role": "user", "content": "Hi"}]
PARIS = [{"role": "assistant", "content": "Paris"}]
LYON = [{"role": "assistant", "content": "Lyon"}]
PAIRS = [
    {"prompt": "The movie", "chosen": " was wonderful", "rejected": " was terrible"},
    {"prompt": "I loved the acting", "chosen": "; the music was great!", "rejected": "."},
    {"prompt": "Write a short review", "chosen": " of a film about space", "rejected": " no"},
]


class QA(Format):
    """The recipe: question/better/worse, a preference pair under other names."""

    name = "qa"
    fields = {"question": "prompt", "better": "answer", "worse": "answer"}
    summary = "question/better/worse"

    def row_problems(self, row, chat):
        return identical_problem(row, "better", "worse", chat)

    def split(self, row, chat):
        return row["question"], [row["better"], row["worse"]]


@pytest.fixture
def qa():
    """QA registered for one test, then removed, so other tests see the built-ins only."""
    register_format(QA)
    yield FORMATS["qa"]
    del FORMATS["qa"]


def as_qa(row):
    return {"question": row["prompt"], "better": row["chosen"], "worse": row["rejected"]}


def built(source, tokenizer):
    dm = PreferenceDataModule(source, tokenizer, val_fraction=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    ("row", "name", "chat"),
    [
        (PAIRS[0], "pair", False),
        ({"prompt": USER, "chosen": PARIS, "rejected": LYON}, "pair", True),
        ({"chosen": "Q: a cat", "rejected": "Q: a dog"}, "implicit", False),
        ({"chosen": USER + PARIS, "rejected": USER + LYON}, "implicit", True),
        ({"prompt": "The movie", "completion": " was wonderful"}, "completion", False),
        ({"prompt": USER, "completion": PARIS, "score": 1}, "completion", True),
    ],
)
def test_built_in_formats_are_recognised_from_their_columns(tokenizer, row, name, chat):
    fmt, is_chat = detect_format(datasets.Dataset.from_list([row]), "data", tokenizer)
    assert (fmt, is_chat) == (FORMATS[name], chat)


def test_format_checks_name_the_field(qa):
    """A row's problems come from its format, each naming the field it is about."""
    pair, completion = FORMATS["pair"], FORMATS["completion"]
    assert pair.problems({"prompt": "", "chosen": "", "rejected": " b"}, False) == [
        "'prompt' is empty"  # an empty answer is a preference ("say nothing"); a prompt is not
    ]
    assert completion.problems({"prompt": USER, "completion": USER}, True) == [
        "'completion' starts with a 'user' message; it should hold only the assistant's answer "
        "(is the prompt repeated in it?)"
    ]
    assert qa.problems({"question": "Q", "better": None, "worse": 3}, False) == [
        "'better' is null or missing",
        "'worse' must be a string, got int",
    ]
    assert qa.problems({"question": "Q", "better": " a", "worse": " a "}, False) == [
        "'better' is identical to 'worse'"
    ]


def test_a_registered_format_trains_like_the_pair_it_renames(qa, tokenizer, tmp_path):
    """The same rows as question/better/worse and as prompt/chosen/rejected: the same tokens."""
    ours = built(write_jsonl(tmp_path / "qa.jsonl", [as_qa(r) for r in PAIRS]), tokenizer)
    pairs = built(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tokenizer)
    assert ours.train_dataset.to_list() == pairs.train_dataset.to_list()
    assert len(ours.train_dataset) == len(PAIRS)


def test_a_registered_format_reports_bad_rows_by_its_own_fields(qa, tokenizer, tmp_path):
    rows = [as_qa(r) for r in PAIRS] + [{"question": "Q", "better": " same", "worse": " same"}]
    with pytest.raises(ValueError, match=r"line 4: 'better' is identical to 'worse'"):
        built(write_jsonl(tmp_path / "qa.jsonl", rows), tokenizer)


def test_unrecognised_columns_list_every_registered_format(qa, tokenizer):
    with pytest.raises(ValueError) as err:
        detect_format(datasets.Dataset.from_list([{"q": "a"}]), "data", tokenizer)
    assert str(err.value) == (
        "data: no 'chosen'/'rejected', 'completion' or 'better'/'worse' column; found ['q']. "
        "Rows need prompt/chosen/rejected, chosen/rejected (implicit prompt), prompt/completion "
        "or question/better/worse, or columns naming yours (e.g. columns: {prompt: question, "
        "chosen: response_j, rejected: response_k})"
    )


def test_registering_a_taken_name_is_refused(qa):
    with pytest.raises(ValueError, match="a format named 'qa' is already registered"):
        register_format(QA)


@pytest.mark.parametrize("chat", [False, True])
def test_single_completions_tokenize_and_batch_as_the_first_half_of_pairs(chat):
    """tokenize_completions gives the ids of PreferenceDataModule's completion rows, uncut;
    collate_sequences batches them exactly as collate_pairs lays out the chosen rows of pairs of
    a completion with itself."""
    tokenizer = build_tokenizer()
    prompts = [USER, USER + PARIS + USER] if chat else ["The movie", "I loved the acting"]
    long = [{"role": "assistant", "content": "Paris" * 8}] if chat else " was wonderful" * 3
    completions = [long, LYON if chat else "!"]
    prompt_ids, completion_ids = tokenize_completions(tokenizer, prompts, completions)

    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]
    dm = PreferenceDataModule(
        datasets.Dataset.from_list(rows), tokenizer, val_fraction=0, max_length=20
    )
    dm.setup("fit")
    assert prompt_ids == dm.train_dataset["prompt_input_ids"]
    cut = dm.train_dataset["chosen_input_ids"]
    assert completion_ids[1] == cut[1]
    assert len(completion_ids[0]) > len(cut[0]) and completion_ids[0][: len(cut[0])] == cut[0]

    single = collate_sequences(list(zip(prompt_ids, completion_ids, strict=True)), 0)
    pairs = collate_pairs(
        [
            {"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": c}
            for p, c in zip(prompt_ids, completion_ids, strict=True)
        ],
        0,
    )
    assert single.keys() == pairs.keys()
    for key, value in single.items():
        assert torch.equal(value, pairs[key][: len(prompts)])
