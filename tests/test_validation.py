"""The catalogue of bad input: every kind of problem lit_dpo reports, and the words it uses.

Three tables: bad rows (each checked under both `on_bad_rows` policies), bad files and sources,
and bad settings. docs/errors.md shows the same catalogue to users; the last test keeps every
message checked here quoted there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import lightning as L
import pytest

from conftest import CHAT_TEMPLATE, build_tokenizer, write_jsonl
from lit_dpo.data import PreferenceDataModule
from lit_dpo.module import DPOModule

DOCS = Path(__file__).parents[1] / "docs" / "errors.md"

PAIR = {"prompt": "The movie", "chosen": " was wonderful", "rejected": " was terrible"}
USER = [{"role": "user", "content": "Hi"}]
OTHER_USER = [{"role": "user", "content": "Hello"}]
SYSTEM = [{"role": "system", "content": "Be brief."}]
PARIS = [{"role": "assistant", "content": "Paris"}]
LYON = [{"role": "assistant", "content": "Lyon"}]
CHAT = {"prompt": USER, "chosen": PARIS, "rejected": LYON}
CHAT_IMPLICIT = {"chosen": USER + PARIS, "rejected": USER + LYON}
HH = "\n\nHuman: Hi\n\nAssistant:"
LONG = " the movie was wonderful" * 4  # 37 tokens with BOS
# UltraFeedback-binarized: a prompt string, whole conversations holding it (more: test_data_faults)
UF = {"prompt": "Hi", "chosen": USER + PARIS, "rejected": USER + LYON, "score_chosen": 8.0}
# Pairs under other names, read through `columns` (the schemas: tests/test_data_layouts.py)
SE = {"qid": 1, "question": "Q?", "date": "2010/09/13", "response_j": "Yes.", "response_k": "No."}
SE_COLUMNS = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
SHP = {"post_id": "a1", "history": "Q?", "human_ref_A": "Yes.", "human_ref_B": "No.", "labels": 1}
SHP_COLUMNS = {"prompt": "history", "chosen": "human_ref_A", "rejected": "human_ref_B"}
SHP_COLUMNS |= {"label": "labels"}


def built(dataset, tokenizer, **kwargs):
    """A module after prepare_data and setup, as the Trainer would leave it."""
    dm = PreferenceDataModule(dataset, tokenizer, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------ bad rows


@dataclass
class BadRow:
    """A bad row between two good ones (line 2 of a JSON Lines file) and what the user reads."""

    good: dict
    bad: dict
    message: str
    settings: dict = field(default_factory=dict)
    template: str = CHAT_TEMPLATE


# raises for one message, so that only the row holding it is refused
PICKY_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] == 'boom' %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE
)

BAD_ROWS = {
    # standard rows: strings
    "null-field": BadRow(PAIR, {**PAIR, "prompt": None}, "'prompt' is null or missing"),
    "row-without-a-field": BadRow(  # a standard file with an implicit-prompt row in it
        PAIR, {"chosen": "a b", "rejected": "a c"}, "'prompt' is null or missing"
    ),
    # an empty answer is a preference ("say nothing"; tests/test_data_layouts.py), a prompt not
    "empty-prompt": BadRow(PAIR, {**PAIR, "prompt": ""}, "'prompt' is empty"),
    "whitespace-only-prompt": BadRow(
        PAIR, {**PAIR, "prompt": " \n\t"}, "'prompt' is whitespace only"
    ),
    "not-a-string": BadRow(PAIR, {**PAIR, "chosen": 5}, "'chosen' must be a string, got int"),
    "identical-completions": BadRow(
        PAIR, {**PAIR, "rejected": PAIR["chosen"]}, "'chosen' is identical to 'rejected'"
    ),
    "both-answers-empty": BadRow(  # one silence may be preferred, not silence to silence
        PAIR, {**PAIR, "chosen": "", "rejected": " "}, "'chosen' is identical to 'rejected'"
    ),
    "prompt-repeated-in-text-completions": BadRow(  # prompt + full transcripts
        PAIR,
        {"prompt": "Is it good?", "chosen": "Is it good? Yes.", "rejected": "Is it good? No."},
        "'chosen' and 'rejected' both start with the whole 'prompt': strip it from them (or, for "
        "full Anthropic-HH transcripts, drop the 'prompt' column to read them as implicit-prompt "
        "rows)",
    ),
    "mixed-formats": BadRow(
        PAIR,
        {**PAIR, "chosen": PARIS},
        "'chosen' is a list of messages, but the split's first row is text (mixed formats)",
    ),
    # conversational rows: lists of {role, content} messages
    "unknown-role": BadRow(
        CHAT,
        {**CHAT, "prompt": [{"role": "human", "content": "Hi"}]},
        "'prompt' has a message with unknown role 'human' "
        "(known: system, developer, user, assistant, tool)",
    ),
    "missing-content": BadRow(
        CHAT,
        {**CHAT, "chosen": [{"role": "assistant"}]},
        "'chosen' has a message without 'content'",
    ),
    "sharegpt-keys": BadRow(
        CHAT,
        {**CHAT, "prompt": [{"from": "human", "value": "Hi"}]},
        "'prompt' has a message without a 'role' (ShareGPT 'from'/'value'? rename to "
        "'role'/'content')",
    ),
    "content-not-a-string": BadRow(
        CHAT,
        {**CHAT, "chosen": [{"role": "assistant", "content": 5}]},
        "'chosen' has a message whose 'content' is int, not a string",
    ),
    "last-turn-not-assistant": BadRow(
        CHAT,
        {**CHAT, "rejected": LYON + [{"role": "user", "content": "Sure?"}]},
        "'rejected' ends with a 'user' message, not the assistant's",
    ),
    "prompt-repeated-in-completion": BadRow(
        CHAT,
        {**CHAT, "chosen": USER + PARIS},
        "'chosen' starts with a 'user' message; it should hold only the assistant's answer "
        "(is the prompt repeated in it?)",
    ),
    "empty-message-list": BadRow(
        CHAT, {**CHAT, "chosen": []}, "'chosen' is an empty list of messages"
    ),
    "empty-sft-answer": BadRow(  # in a pair, an empty answer is EOS alone; in SFT, nothing
        {"prompt": USER, "completion": PARIS},
        {"prompt": USER, "completion": [{"role": "assistant", "content": " "}]},
        "'completion' ends with an empty assistant message",
    ),
    "empty-prompt-messages": BadRow(
        CHAT,
        {**CHAT, "prompt": [{"role": "user", "content": ""}]},
        "'prompt' has only empty messages",
    ),
    "messages-not-dicts": BadRow(
        CHAT,
        {**CHAT, "chosen": ["Paris"]},
        "'chosen' must be a list of {role, content} messages, got a list of str",
    ),
    "string-among-messages": BadRow(
        CHAT,
        {**CHAT, "chosen": "Paris"},
        "'chosen' is a string, but the split's first row is messages (mixed formats)",
    ),
    # implicit-prompt rows: chosen and rejected hold the whole conversation
    "different-prompts": BadRow(
        CHAT_IMPLICIT,
        {"chosen": USER + PARIS, "rejected": OTHER_USER + LYON},
        "'chosen' and 'rejected' share no prompt messages (different prompts)",
    ),
    "prompts-differ-later": BadRow(
        CHAT_IMPLICIT,
        {"chosen": SYSTEM + USER + PARIS, "rejected": SYSTEM + OTHER_USER + LYON},
        "'chosen' and 'rejected' differ before the assistant's answer (different prompts)",
    ),
    "implicit-last-turn-not-assistant": BadRow(
        CHAT_IMPLICIT,
        {"chosen": USER + PARIS + OTHER_USER, "rejected": USER + LYON},
        "'chosen' ends with a 'user' message, not the assistant's",
    ),
    "one-conversation-inside-the-other": BadRow(
        CHAT_IMPLICIT,
        {"chosen": USER + PARIS, "rejected": USER + PARIS + OTHER_USER + LYON},
        "'chosen' or 'rejected' has no answer after the prompt they share",
    ),
    "implicit-text-no-shared-prompt": BadRow(
        {"chosen": HH + " The cat", "rejected": HH + " The dog"},
        {"chosen": "Cats purr", "rejected": "Dogs bark"},
        "'chosen' and 'rejected' share no beginning to use as the prompt",
    ),
    "implicit-text-without-hh-turn": BadRow(  # where the prompt ends would be a guess
        {"chosen": HH + " The cat", "rejected": HH + " The dog"},
        {"chosen": "The answer is 4", "rejected": "The answer is 5"},
        "'chosen' and 'rejected' start alike but share no Anthropic-HH turn ending in "
        "'\\n\\nAssistant:', so where the prompt ends is unknown: give the prompt in a 'prompt' "
        "column",
    ),
    "implicit-text-different-hh-prompts": BadRow(
        {"chosen": HH + " The cat", "rejected": HH + " The dog"},
        {
            "chosen": HH + " Hello\n\nHuman: Bye\n\nAssistant: Ciao",
            "rejected": HH + " Hello\n\nHuman: Stay\n\nAssistant: Sure",
        },
        "'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' turn (different "
        "prompts)",
    ),
    # UltraFeedback-binarized rows: a prompt string and whole conversations
    "prompt-not-in-the-conversations": BadRow(
        UF,
        {**UF, "prompt": "Hello"},
        "'prompt' is not the last user message that 'chosen' and 'rejected' share",
    ),
    # rows under other column names (`columns`): messages name the user's columns
    "mapped-identical-answers": BadRow(  # StackExchange-paired
        SE,
        {**SE, "response_k": SE["response_j"]},
        "'response_j' is identical to 'response_k'",
        settings={"columns": SE_COLUMNS},
    ),
    "mapped-null-prompt": BadRow(
        SE,
        {**SE, "question": None},
        "'question' is null or missing",
        settings={"columns": SE_COLUMNS},
    ),
    "label-not-0-or-1": BadRow(  # SHP
        SHP,
        {**SHP, "labels": 2},
        "'labels' must be 1 or 0 (or true/false), got 2",
        settings={"columns": SHP_COLUMNS},
    ),
    # completion (SFT) rows
    "empty-completion": BadRow(
        {"prompt": "The movie", "completion": " was good"},
        {"prompt": "The movie", "completion": ""},
        "'completion' is empty",
    ),
    # found while tokenizing
    "prompt-longer-than-max-length": BadRow(
        PAIR,
        {**PAIR, "prompt": LONG},
        "prompt too long: no room for a completion within max_length=12 "
        "(prompts are cut to max_prompt_length=12 first)",
        settings={"max_length": 12, "max_prompt_length": 12},
    ),
    "identical-after-truncation": BadRow(  # cut to 5 completion tokens: a tie
        PAIR,
        {**PAIR, "chosen": " was wonderful, a delight", "rejected": " was wonderful, a bore"},
        "'chosen' and 'rejected' are identical after truncation to max_length=8: raise "
        "max_length (or lower max_prompt_length) so that the tokens where they differ fit",
        settings={"max_length": 8, "max_prompt_length": 4},
    ),
    "refused-by-the-chat-template": BadRow(
        CHAT,
        {**CHAT, "chosen": [{"role": "assistant", "content": "boom"}]},
        "the chat template refuses it: roles must alternate",
        template=PICKY_TEMPLATE,
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_stops_before_training(case, tmp_path):
    """on_bad_rows=error: the file, split, line and problem, and the count of each problem."""
    source = write_jsonl(tmp_path / "pairs.jsonl", [case.good, case.bad, case.good])
    tokenizer = build_tokenizer(chat_template=case.template)
    with pytest.raises(ValueError) as raised:
        built(source, tokenizer, val_fraction=0, **case.settings)
    assert str(raised.value).splitlines() == [
        f"{source}: split 'train': 1 of 3 rows cannot be trained on:",
        f"  line 2: {case.message}",
        f"  by problem: 1 row: {case.message}",
        "fix these rows, or set on_bad_rows: skip to train on the rest (the skipped rows are "
        "written, with their reasons, to a rejects file)",
    ]


@pytest.mark.parametrize("case", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_row_is_skipped_with_its_reason(case, tmp_path):
    """on_bad_rows=skip: the others train; the row is in the rejects file with its reason."""
    source = write_jsonl(tmp_path / "pairs.jsonl", [case.good, case.bad, case.good])
    rejects = tmp_path / "rejects.jsonl"
    tokenizer = build_tokenizer(chat_template=case.template)
    dm = built(
        source,
        tokenizer,
        val_fraction=0,
        on_bad_rows="skip",
        rejects_path=str(rejects),
        **case.settings,
    )
    assert len(dm.train_dataset) == 2
    assert dm.stats["train"]["skipped"] == 1
    assert dm.stats["train"]["problems"] == {case.message: 1}
    (reject,) = map(json.loads, rejects.read_text().splitlines())
    assert {k: reject[k] for k in ("split", "row", "where", "problems")} == {
        "split": "train",
        "row": 2,
        "where": "line 2",
        "problems": [case.message],
    }


def test_error_names_the_first_rows_and_counts_every_problem(tokenizer, tmp_path):
    """Every row is checked: 7 bad rows of 10, the first 5 quoted by line number (blank lines
    count: they are lines of the file, though not rows), all 7 counted by problem."""
    rows = [PAIR] * 3 + [{**PAIR, "prompt": ""}] * 4 + [{**PAIR, "rejected": PAIR["chosen"]}] * 2
    rows.append({**PAIR, "prompt": None, "rejected": None})  # two problems in one row
    source = tmp_path / "pairs.jsonl"
    source.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as raised:
        built(str(source), tokenizer)
    assert str(raised.value).splitlines()[:8] == [
        f"{source}: split 'train': 7 of 10 rows cannot be trained on:",
        "  line 5: 'prompt' is empty",
        "  line 6: 'prompt' is empty",
        "  line 7: 'prompt' is empty",
        "  line 8: 'prompt' is empty",
        "  line 9: 'chosen' is identical to 'rejected'",
        "  ... 2 more rows",
        "  by problem: 4 rows: 'prompt' is empty; 2 rows: 'chosen' is identical to 'rejected'; "
        "1 row: 'prompt' is null or missing; 1 row: 'rejected' is null or missing",
    ]


def test_skip_writes_rejects_beside_the_run_and_logs_a_summary(tokenizer, tmp_path, caplog):
    """Without rejects_path the file goes to the Trainer's log_dir; the summary is logged and
    kept in `stats`; the data of each skipped row is written as it was read."""
    bad = {**PAIR, "prompt": "", "score": 3}
    rows = [{**PAIR, "score": 1}] * 4 + [bad, {**PAIR, "prompt": None, "score": 2}]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(source, tokenizer, val_fraction=0, on_bad_rows="skip")
    trainer = L.Trainer(default_root_dir=tmp_path / "run", logger=False, accelerator="cpu")
    dm.trainer = trainer
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    dm.prepare_data()
    dm.setup("fit")
    rejects = tmp_path / "run" / "rejects.jsonl"
    assert "train: 6 rows, 2 skipped, 0 prompts truncated" in caplog.text
    assert (
        f"train: skipped 1 row: 'prompt' is empty; 1 row: 'prompt' is null or missing; "
        f"each skipped row is in {rejects} with its reasons"
    ) in caplog.text
    assert dm.stats["train"]["rows"] == 6 and dm.stats["train"]["skipped"] == 2
    first, second = map(json.loads, rejects.read_text().splitlines())
    assert first == {
        "split": "train",
        "row": 5,
        "where": "line 5",
        "problems": ["'prompt' is empty"],
        "data": bad,
    }
    assert second["row"] == 6 and second["data"]["prompt"] is None


def test_skip_counts_reach_the_experiment_logger(tokenizer, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    rows = [PAIR] * 4 + [{**PAIR, "prompt": ""}]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceDataModule(source, tokenizer, val_fraction=0, on_bad_rows="skip")
    dm.trainer = L.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu")
    dm.prepare_data()
    dm.setup("fit")
    hparams = dm.trainer.logger.experiment.hparams
    assert hparams["data/train/rows"] == 5 and hparams["data/train/skipped"] == 1


def test_rejects_default_to_the_working_directory(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [PAIR, {**PAIR, "prompt": ""}]
    built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0, on_bad_rows="skip")
    (reject,) = map(json.loads, (tmp_path / "rejects.jsonl").read_text().splitlines())
    assert reject["where"] == "row 2"  # not a file: rows counted from 1


def test_bad_rows_in_several_files_name_the_file(tokenizer, tmp_path):
    write_jsonl(tmp_path / "train-0.jsonl", [PAIR, PAIR])
    write_jsonl(tmp_path / "train-1.jsonl", [PAIR, {**PAIR, "prompt": ""}])
    with pytest.raises(ValueError, match=r"\n  train-1\.jsonl line 2: 'prompt' is empty\n"):
        built(str(tmp_path), tokenizer)


# ------------------------------------------------------------------------ bad files and sources


def write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def missing_train_split(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl", [PAIR])
    return str(tmp_path)


def directory_without_split_files(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    return str(tmp_path)


def file_named_after_no_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [PAIR])
    write_jsonl(tmp_path / "extra.jsonl", [PAIR])
    return str(tmp_path)


def one_split_under_two_names(tmp_path):
    for name in ("train", "val", "validation"):
        write_jsonl(tmp_path / f"{name}.jsonl", [PAIR])
    return str(tmp_path)


def csv_files_with_different_columns(tmp_path):
    write(tmp_path / "train-0.csv", "prompt,chosen,rejected\na,b,c\n")
    write(tmp_path / "train-1.csv", "prompt,chosen\na,b\n")
    return str(tmp_path)


def mixed_file_types(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [PAIR])
    write(tmp_path / "validation.csv", "prompt,chosen,rejected\na,b,c\n")
    return str(tmp_path)


BAD_SOURCES = {
    # id: (source from tmp_path, exception, a message the user reads)
    "missing-file": (
        lambda tmp: str(tmp / "nope.jsonl"),
        FileNotFoundError,
        "dataset file or directory not found:",
    ),
    "missing-split": (missing_train_split, ValueError, "no 'train' split; found ['validation']"),
    "directory-without-split-files": (
        directory_without_split_files,
        FileNotFoundError,
        "no data files named after a split (train, validation, test)",
    ),
    "data-file-named-after-no-split": (
        file_named_after_no_split,
        ValueError,
        "extra.jsonl: data file named after no split; name each file after its split (train, "
        "validation, test; validation also as valid/val/dev/eval/evaluation) or move it out of "
        "the directory",
    ),
    "one-split-under-two-names": (
        one_split_under_two_names,
        ValueError,
        "val.jsonl, validation.jsonl all hold split 'validation' under different names; keep one",
    ),
    "csv-files-with-different-columns": (
        csv_files_with_different_columns,
        ValueError,
        "columns ['prompt', 'chosen'] differ from",
    ),
    "unsupported-file-type": (
        lambda tmp: write(tmp / "pairs.txt", "x"),
        ValueError,
        "unsupported file type; use one of ['.csv', '.json', '.jsonl', '.parquet']",
    ),
    "mixed-file-types": (
        mixed_file_types,
        ValueError,
        "mixes file formats ['csv', 'json']; use one",
    ),
    "unknown-hub-dataset": (
        lambda tmp: "no-such-org/no-such-data",
        ValueError,
        "could not load dataset 'no-such-org/no-such-data' from the Hub",
    ),
    "hub-dataset-offline": (
        lambda tmp: "no-such-org/no-such-data",
        ValueError,
        "dataset file or directory not found: no-such-org/no-such-data; could not load dataset "
        "'no-such-org/no-such-data' from the Hub either (HF_HUB_OFFLINE is set, and it is not in "
        "the cache)",
    ),
    "missing-column": (
        lambda tmp: write_jsonl(tmp / "p.jsonl", [{"prompt": "a", "chosen": "b"}]),
        ValueError,
        "missing column 'rejected'; found ['prompt', 'chosen']",
    ),
    "prompt-under-another-name": (
        lambda tmp: write_jsonl(tmp / "p.jsonl", [{"instruction": "a", "completion": "b"}]),
        ValueError,
        "missing column 'prompt'; found ['instruction', 'completion'] ('instruction' looks like "
        "the prompt: rename it to 'prompt', or set columns: {prompt: instruction})",
    ),
    "unpaired-kto-rows": (
        lambda tmp: datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "label": True}]),
        ValueError,
        "unpaired prompt/completion rows with a 'label' column (KTO-style): lit_dpo trains on "
        "pairs (prompt/chosen/rejected) with DPOModule or on completions with SFTModule; pair "
        "each prompt's desirable and undesirable completions as chosen and rejected, or keep "
        "only the desirable rows and drop 'label' for SFT",
    ),
    "no-known-columns": (
        lambda tmp: write_jsonl(tmp / "p.jsonl", [{"question": "a", "answer": "b"}]),
        ValueError,
        "no 'chosen'/'rejected' or 'completion' column; found ['question', 'answer']. Rows need "
        "prompt/chosen/rejected, chosen/rejected (implicit prompt) or prompt/completion, or "
        "columns naming yours (e.g. columns: {prompt: question, chosen: response_j, rejected: "
        "response_k})",
    ),
    "empty-split": (
        lambda tmp: datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}),
        ValueError,
        "in-memory dataset: split 'train': no rows",
    ),
    "empty-file": (
        lambda tmp: write(tmp / "p.jsonl", "\n"),
        ValueError,
        "no rows (the file is empty)",
    ),
    "invalid-json-line": (
        lambda tmp: write(tmp / "p.jsonl", json.dumps(PAIR) + '\n{"prompt": "a" "chosen": "b"}\n'),
        ValueError,
        "1 bad line: line 2: not valid JSON (Expecting ',' delimiter, column 16)",
    ),
    "invalid-json-array": (
        lambda tmp: write(tmp / "p.json", "[\n" + json.dumps(PAIR) + ",\n" + '{"prompt": }\n]'),
        ValueError,
        "line 3: not valid JSON (Expecting value, column 12)",
    ),
    "json-line-not-an-object": (
        lambda tmp: write(tmp / "p.jsonl", json.dumps(PAIR) + "\n[1, 2]\n"),
        ValueError,
        "line 2: not a JSON object but list",
    ),
    "lone-utf16-surrogate": (  # valid JSON, but no text
        lambda tmp: write(
            tmp / "p.jsonl",
            json.dumps(PAIR) + '\n{"prompt": "a", "chosen": "\\ud800", "rejected": "c"}\n',
        ),
        ValueError,
        "line 2: 'chosen' holds a lone UTF-16 surrogate ('\\ud800'), which is not text: remove it, "
        "or escape the whole character (a surrogate pair)",
    ),
    "invalid-utf8": (
        lambda tmp: write(tmp / "p.jsonl", json.dumps(PAIR).encode() + b'\n{"prompt": "\xff"}\n'),
        ValueError,
        "line 2: not valid UTF-8 (byte 0xff at byte 13)",
    ),
    "invalid-utf8-csv": (
        lambda tmp: write(tmp / "p.csv", b"prompt,chosen,rejected\na,b,c\n\xe9t\xe9,b,c\n"),
        ValueError,
        "line 3: not valid UTF-8 (byte 0xe9 at byte 1)",
    ),
    "csv-record-with-a-missing-field": (  # pandas filled it with an empty cell
        lambda tmp: write(tmp / "p.csv", "prompt,chosen,rejected\na,b,c\nd,e\n"),
        ValueError,
        "line 3: 2 fields, but the header has 3",
    ),
    "csv-quote-never-closed": (
        lambda tmp: write(tmp / "p.csv", 'prompt,chosen,rejected\na,"b\nc",d\ne,"f,g\n'),
        ValueError,
        "line 4: not valid CSV (unexpected end of data)",
    ),
    "corrupt-parquet": (
        lambda tmp: write(tmp / "p.parquet", b"PAR1 not really"),
        ValueError,
        "p.parquet: could not be loaded:",
    ),
    # (source, settings): the data layout settings
    "mapped-column-not-there": (
        lambda tmp: (
            datasets.Dataset.from_list([SE]),
            {"columns": {**SE_COLUMNS, "prompt": "title"}},
        ),
        ValueError,
        "in-memory dataset: split 'train': columns maps 'prompt' to 'title': no such column; "
        "found ['qid', 'question', 'date', 'response_j', 'response_k']",
    ),
    "label-on-unpaired-rows": (
        lambda tmp: (
            datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "ok": 1}]),
            {"columns": {"label": "ok"}},
        ),
        ValueError,
        "columns: 'label' ('ok') says which of two answers is better, but the split holds "
        "prompt/completion rows",
    ),
    "data-files-not-there": (
        lambda tmp: (str(tmp), {"data_files": {"train": "nope.jsonl"}}),
        FileNotFoundError,
        "data_files: dataset file or directory not found:",
    ),
    "data-files-of-a-file": (
        lambda tmp: (write_jsonl(tmp / "p.jsonl", [PAIR]), {"data_files": "p.jsonl"}),
        ValueError,
        "data_files picks files of a directory or Hub dataset, not of a file",
    ),
    "revision-of-local-data": (
        lambda tmp: (write_jsonl(tmp / "p.jsonl", [PAIR]), {"revision": "v1.0"}),
        ValueError,
        "revision='v1.0' picks a version of a Hub dataset;",
    ),
    "data-files-of-rows-in-memory": (
        lambda tmp: (datasets.Dataset.from_list([PAIR]), {"data_files": "p.jsonl"}),
        ValueError,
        "revision and data_files apply to a Hub dataset or to files, not to rows in memory",
    ),
    "too-few-rows-to-hold-out-validation": (
        lambda tmp: datasets.Dataset.from_list([PAIR]),
        ValueError,
        "too few rows (1) to hold out val_fraction=0.05 for validation; add rows or a "
        "validation split, or set val_fraction: 0",
    ),
}


@pytest.mark.parametrize(("make", "error", "message"), BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_bad_source(make, error, message, tokenizer, tmp_path):
    source = make(tmp_path)
    source, settings = source if isinstance(source, tuple) else (source, {})
    with pytest.raises(error) as raised:
        built(source, tokenizer, **settings)
    assert message in str(raised.value)


def test_invalid_json_names_the_file_and_every_bad_line(tokenizer, tmp_path):
    lines = [json.dumps(PAIR)] * 3 + ["{oops"] * 7
    source = write(tmp_path / "p.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError) as raised:
        built(source, tokenizer)
    assert str(raised.value) == (
        f"{source}: 7 bad lines: "
        + "; ".join(
            f"line {n}: not valid JSON (Expecting property name enclosed in double quotes, "
            f"column 2)"
            for n in range(4, 9)
        )
        + "; ... 2 more"
    )


def test_all_rows_bad_under_skip_is_still_an_error(tokenizer, tmp_path):
    rows = [{**PAIR, "prompt": ""}, {**PAIR, "rejected": None}]
    with pytest.raises(
        ValueError, match=r"2 of 2 rows cannot be trained on:(.|\n)*\nno rows left to train on$"
    ):
        built(
            datasets.Dataset.from_list(rows),
            tokenizer,
            on_bad_rows="skip",
            rejects_path=str(tmp_path / "r.jsonl"),
        )


def no_eos_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.eos_token = None
    return tokenizer


def lowercasing_tokenizer():
    from tokenizers import normalizers

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tokenizer


BAD_TOKENIZERS = {
    "no-tokenizer": (lambda: None, [PAIR], "PreferenceDataModule needs a tokenizer"),
    "no-eos-token": (
        no_eos_tokenizer,
        [PAIR],
        "the tokenizer has no EOS token to end completions with",
    ),
    "conversational-rows-without-chat-template": (
        lambda: build_tokenizer(chat_template=None),
        [CHAT],
        "rows are conversational but the tokenizer has no chat template",
    ),
    "a-tie-only-the-tokenizer-sees": (  # "Was" and "was": the same tokens once lowercased
        lowercasing_tokenizer,
        [PAIR, {**PAIR, "chosen": " Was wonderful", "rejected": " was wonderful"}],
        "'chosen' and 'rejected' are different texts but the same tokens",
    ),
    "chat-template-that-does-not-extend-the-prompt": (
        lambda: build_tokenizer(
            chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}"
            "{% if add_generation_prompt %}>{% endif %}"
        ),
        [CHAT],
        "row 1: the chat template does not render the prompt (with generation prompt) as a "
        "prefix of prompt + completion, so the completion cannot be cut out",
    ),
}


@pytest.mark.parametrize(
    ("make", "rows", "message"), BAD_TOKENIZERS.values(), ids=BAD_TOKENIZERS.keys()
)
def test_bad_tokenizer(make, rows, message):
    with pytest.raises(ValueError) as raised:
        built(datasets.Dataset.from_list(rows), make(), val_fraction=0)
    assert message in str(raised.value)


def test_tokenizer_without_pad_token_is_handled(tokenizer, caplog):
    """Not an error: batches are padded with EOS, masked out (see test_data.py), and it is said."""
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    dm = built(datasets.Dataset.from_list([PAIR]), build_tokenizer(pad=False), val_fraction=0)
    assert len(dm.train_dataset) == 1
    assert "the tokenizer has no pad token: batches are padded with EOS (masked)" in caplog.text


def test_prompt_longer_than_max_length_is_truncated_and_counted(tokenizer, caplog):
    """Not an error with max_prompt_length < max_length: the prompt is cut, and counted."""
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    rows = [PAIR, {**PAIR, "prompt": LONG}]
    dm = built(datasets.Dataset.from_list(rows), tokenizer, max_length=12, max_prompt_length=4)
    assert "train: 2 rows, 0 skipped, 1 prompts truncated" in caplog.text
    assert len(dm.train_dataset) + len(dm.val_dataset) == 2


# --------------------------------------------------------------------------------- bad settings

BAD_SETTINGS = {
    "val-fraction-out-of-range": (
        lambda: PreferenceDataModule("x.jsonl", val_fraction=1.0),
        "val_fraction must be in [0, 1), got 1.0",
    ),
    "max-length-not-positive": (
        lambda: PreferenceDataModule("x.jsonl", max_length=0),
        "max_length and max_prompt_length must be positive",
    ),
    "batch-size-not-positive": (
        lambda: PreferenceDataModule("x.jsonl", batch_size=0),
        "batch_size must be a positive integer, got 0",
    ),
    "unknown-on-bad-rows": (
        lambda: PreferenceDataModule("x.jsonl", on_bad_rows="drop"),
        "on_bad_rows must be error or skip, got 'drop'",
    ),
    "unknown-truncation-mode": (
        lambda: PreferenceDataModule("x.jsonl", truncation_mode="middle"),
        "truncation_mode must be keep_end or keep_start, got 'middle'",
    ),
    "columns-with-an-unknown-field": (
        lambda: PreferenceDataModule("x.jsonl", columns={"answer": "response"}),
        "columns: unknown field 'answer'; map the row formats' fields",
    ),
    "columns-mapping-two-fields-to-one-column": (
        lambda: PreferenceDataModule("x.jsonl", columns={"chosen": "text", "rejected": "text"}),
        "columns: ['text'] mapped to more than one field",
    ),
    "chat-template-neither-jinja-nor-a-file": (
        lambda: PreferenceDataModule("x.jsonl", chat_template="templates/chatml.jinja"),
        "chat_template: 'templates/chatml.jinja' is neither a Jinja template (no '{{' or '{%') "
        "nor a file",
    ),
    # DPOModule loads nothing in __init__, so its checks run without a model
    "negative-beta": (lambda: DPOModule("unused", beta=-0.1), "beta must be positive, got -0.1"),
    "label-smoothing-out-of-range": (
        lambda: DPOModule("unused", label_smoothing=0.5),
        "label_smoothing must be in [0, 0.5), got 0.5",
    ),
    "unknown-loss": (
        lambda: DPOModule("unused", loss_type="dpo"),
        "unknown loss_type 'dpo'; choose from sigmoid, robust, ipo",
    ),
    "loss-weights-mismatch": (
        lambda: DPOModule("unused", loss_type=["sigmoid", "nll"], loss_weights=[1.0]),
        "loss_weights [1.0] must give one weight per loss_type ['sigmoid', 'nll']",
    ),
    "reference-free-with-a-loss-that-needs-a-reference": (
        lambda: DPOModule("unused", reference_free=True, loss_type=["sigmoid", "apo_zero"]),
        "loss_type ['apo_zero'] needs a reference model; unset reference_free",
    ),
    "separate-reference-without-its-path": (
        lambda: DPOModule("unused", reference="separate"),
        "reference='separate' and ref_model_name_or_path=None: a separate reference needs the "
        "path; copy and adapter take none",
    ),
    "copy-reference-with-a-path": (
        lambda: DPOModule("unused", reference="copy", ref_model_name_or_path="sft-model"),
        "reference='copy' and ref_model_name_or_path='sft-model': a separate reference needs the "
        "path; copy and adapter take none",
    ),
    "adapter-reference-without-lora": (
        lambda: DPOModule("unused", reference="adapter"),
        "reference='adapter' needs lora (or a PeftModel policy): the reference is the policy "
        "with its adapters disabled",
    ),
    "reference-free-with-a-reference-strategy": (
        lambda: DPOModule("unused", reference="precomputed", reference_free=True),
        "reference_free builds no reference: unset reference='precomputed'",
    ),
    "infinite-beta": (
        lambda: DPOModule("unused", beta=float("inf")),
        "beta must be a finite positive number, got inf",
    ),
    "label-smoothing-with-a-loss-that-ignores-it": (
        lambda: DPOModule("unused", loss_type="ipo", label_smoothing=0.1),
        "label_smoothing=0.1 is ignored by loss_type ipo: only sigmoid, robust, exo_pair, "
        "sigmoid_norm read it; set label_smoothing to 0, or use one of those",
    ),
}


@pytest.mark.parametrize(
    ("make", "message"),
    BAD_SETTINGS.values(),
    ids=BAD_SETTINGS.keys(),
)
def test_bad_setting(make, message):
    with pytest.raises(ValueError) as raised:
        make()
    assert message in str(raised.value)


# ------------------------------------------------------------------------------------------ docs


def test_docs_quote_every_message():
    """docs/errors.md shows users the messages these tests check, word for word."""
    docs = DOCS.read_text()
    messages = [case.message for case in BAD_ROWS.values()]
    messages += [message for *_, message in BAD_SOURCES.values()]
    messages += [message for *_, message in BAD_TOKENIZERS.values()]
    messages += [message for _, message in BAD_SETTINGS.values()]
    missing = [m for m in messages if m not in docs]
    assert not missing, missing
