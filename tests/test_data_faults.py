"""Data as users have it: nothing trains silently wrong, nothing fails with a traceback.

Each test writes rows in the exact schema a user brings (Anthropic-HH transcripts, verbatim from
tests/data/hh-rlhf/; UltraFeedback-binarized as HuggingFaceH4/ultrafeedback_binarized ships it;
CSV from a spreadsheet; TRL/KTO unpaired rows) and checks that lit_dpo either reads them right or
refuses them in one message naming the file, row and field and what to fix. The message
catalogue is tests/test_validation.py (and docs/errors.md); these tests follow each case through.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest

from conftest import write_jsonl
from lit_dpo.data import PreferenceDataModule

ROOT = Path(__file__).parents[1]
HH = Path(__file__).parent / "data" / "hh-rlhf" / "harmless-base-test-sample.jsonl"
PAIR = {"prompt": "The movie", "chosen": " was wonderful", "rejected": " was terrible"}


def built(dataset, tokenizer, **kwargs):
    """A module after prepare_data and setup, as the Trainer would leave it."""
    dm = PreferenceDataModule(dataset, tokenizer, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def decoded(tokenizer, dm, column, split="train"):
    data = {"train": dm.train_dataset, "validation": dm.val_dataset}[split]
    return [tokenizer.decode(ids) for ids in data[column]]


# ------------------------------------------------------------ 1, 2: pairs that teach nothing


def test_pairs_differing_only_past_max_length_are_ties_refused_or_skipped(tokenizer, tmp_path):
    """Two answers sharing their first 90 tokens, cut to max_length=16: the same tokens, a tie
    that would train as one (loss ln 2, no gradient toward either). Refused, or skipped and
    counted; the pair that still differs after the cut trains."""
    shared = " the movie was wonderful" * 10
    rows = [PAIR, {**PAIR, "chosen": shared + " indeed", "rejected": shared + " not"}]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tie = (
        "'chosen' and 'rejected' are identical after truncation to max_length=16: raise "
        "max_length (or lower max_prompt_length) so that the tokens where they differ fit"
    )
    with pytest.raises(ValueError) as raised:
        built(source, tokenizer, val_fraction=0, max_length=16, max_prompt_length=8)
    assert str(raised.value).splitlines()[:2] == [
        f"{source}: split 'train': 1 of 2 rows cannot be trained on:",
        f"  line 2: {tie}",
    ]
    dm = built(
        source,
        tokenizer,
        val_fraction=0,
        max_length=16,
        max_prompt_length=8,
        on_bad_rows="skip",
        rejects_path=str(tmp_path / "rejects.jsonl"),
    )
    assert len(dm.train_dataset) == 1 and dm.stats["train"]["problems"] == {tie: 1}
    assert built(source, tokenizer, val_fraction=0).stats["train"]["skipped"] == 0  # 512 fits


def test_completion_rows_cut_alike_are_not_ties(tokenizer):
    """prompt/completion (SFT) rows are chosen = rejected by design: never a tie."""
    rows = [{"prompt": "The movie", "completion": " was wonderful" * 5}] * 2
    dm = built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0, max_length=8)
    assert len(dm.train_dataset) == 2 and dm.stats["train"]["completions_truncated"] == 4


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
@pytest.mark.parametrize("tie", ["identical", "identical-after-truncation"])
def test_a_dataset_of_ties_is_refused_under_either_policy(tie, on_bad_rows, tokenizer, tmp_path):
    """Every row a tie: nothing to learn, so no run, whatever on_bad_rows says."""
    if tie == "identical":
        rows = [{**PAIR, "prompt": f"Film {i}", "rejected": PAIR["chosen"]} for i in range(4)]
        limits = {}
    else:
        rows = [{**PAIR, "rejected": PAIR["chosen"] + f" {i}"} for i in range(4)]
        limits = {"max_length": 6, "max_prompt_length": 3}
    with pytest.raises(ValueError, match=r"4 of 4 rows cannot be trained on(.|\n)*no rows left"):
        built(
            datasets.Dataset.from_list(rows),
            tokenizer,
            val_fraction=0,
            on_bad_rows=on_bad_rows,
            rejects_path=str(tmp_path / "rejects.jsonl"),
            **limits,
        )


# ------------------------------------------------------------------ 3: where the prompt ends


def hh_rows():
    return [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()]


def hh_prompt(row):
    return row["chosen"][: row["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")]


def test_anthropic_hh_as_published_splits_after_the_last_assistant_turn(tokenizer):
    """The six verbatim rows all train, prompt = every turn up to the last "Assistant:"; the one
    with an empty chosen reply (as 4 rows of the published file have: silence preferred) is EOS
    alone, and counted. The whole published file: tests/test_data_layouts.py."""
    dm = built(str(HH), tokenizer, val_fraction=0)
    rows = hh_rows()
    assert decoded(tokenizer, dm, "prompt_input_ids") == ["<s>" + hh_prompt(r) for r in rows]
    assert decoded(tokenizer, dm, "chosen_input_ids") == [
        r["chosen"][len(hh_prompt(r)) :].rstrip() + "</s>" for r in rows
    ]
    assert decoded(tokenizer, dm, "chosen_input_ids")[0] == "</s>"
    assert dm.stats["train"]["empty_completions"] == 1


def test_hh_transcripts_with_a_prompt_column_are_refused(tokenizer, tmp_path):
    """prompt + full transcripts in chosen and rejected: read as a pair, every answer would
    repeat the prompt."""
    rows = [{"prompt": hh_prompt(r), **r} for r in hh_rows()[1:]]
    with pytest.raises(ValueError) as raised:
        built(write_jsonl(tmp_path / "hh.jsonl", rows), tokenizer, val_fraction=0)
    assert str(raised.value).splitlines()[1] == (
        "  line 1: 'chosen' and 'rejected' both start with the whole 'prompt': strip it from "
        "them (or, for full Anthropic-HH transcripts, drop the 'prompt' column to read them as "
        "implicit-prompt rows)"
    )
    assert "5 of 5 rows" in str(raised.value)


def test_short_prompts_echoed_by_both_answers_still_train(tokenizer):
    """A greeting answered with a greeting is not a repeated prompt."""
    rows = [{"prompt": "Hi there", "chosen": "Hi there! How can I help?", "rejected": "Hi there."}]
    assert len(built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0).train_dataset)


def test_a_prompt_under_another_name_is_not_guessed(tokenizer, tmp_path):
    """question/chosen/rejected: without a 'prompt' column these were implicit-prompt rows, and
    "The answer is" became the prompt. Now refused, and the message names the column."""
    rows = [
        {"question": "What is 2+2?", "chosen": "The answer is 4", "rejected": "The answer is 5"},
        {"question": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    ]
    source = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ValueError) as raised:
        built(source, tokenizer, val_fraction=0)
    assert str(raised.value).splitlines() == [
        f"{source}: split 'train': 2 of 2 rows cannot be trained on:",
        "  line 1: 'chosen' and 'rejected' start alike but share no Anthropic-HH turn ending in "
        "'\\n\\nAssistant:', so where the prompt ends is unknown: give the prompt in a 'prompt' "
        "column",
        "  line 2: 'chosen' and 'rejected' share no beginning to use as the prompt",
        "  by problem: 1 row: 'chosen' and 'rejected' start alike but share no Anthropic-HH "
        "turn ending in '\\n\\nAssistant:', so where the prompt ends is unknown: give the prompt "
        "in a 'prompt' column; 1 row: 'chosen' and 'rejected' share no beginning to use as the "
        "prompt",
        "column 'question' looks like the prompt: rename it to 'prompt'",
        "no rows left to train on",
    ]
    renamed = [{"prompt": r["question"], **r} for r in rows]
    dm = built(write_jsonl(tmp_path / "renamed.jsonl", renamed), tokenizer, val_fraction=0)
    assert decoded(tokenizer, dm, "chosen_input_ids")[0] == "The answer is 4</s>"


# -------------------------------------------------------------- 4: a directory's split files


@pytest.mark.parametrize("name", ["val", "valid", "dev", "eval", "validation-00000-of-00001"])
def test_validation_file_aliases(name, tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [PAIR] * 6)
    write_jsonl(tmp_path / f"{name}.jsonl", [PAIR] * 2)
    dm = built(str(tmp_path), tokenizer)
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (6, 2)  # read, not held out of train


def test_a_data_file_named_after_no_split_is_refused(tokenizer, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [PAIR] * 6)
    write_jsonl(tmp_path / "heldout.jsonl", [PAIR] * 2)
    write_jsonl(tmp_path / "extra.jsonl", [PAIR] * 2)
    (tmp_path / "README.md").write_text("not data")
    with pytest.raises(ValueError) as raised:
        built(str(tmp_path), tokenizer)
    assert str(raised.value) == (
        f"{tmp_path}: extra.jsonl, heldout.jsonl: data files named after no split; name each "
        f"file after its split (train, validation, test; validation also as "
        f"valid/val/dev/eval/evaluation) or move it out of the directory"
    )


def test_shards_and_custom_split_names(tokenizer, tmp_path):
    """Hub-style shards fill one split; custom split names take no aliases, and files of known
    split names not asked for (a test split left out) are no strays."""
    write_jsonl(tmp_path / "train_prefs-00000-of-00002.jsonl", [PAIR] * 3)
    write_jsonl(tmp_path / "train_prefs-00001-of-00002.jsonl", [PAIR] * 2)
    write_jsonl(tmp_path / "test_prefs-00000-of-00001.jsonl", [PAIR] * 2)
    write_jsonl(tmp_path / "test.jsonl", [PAIR])
    dm = built(
        str(tmp_path), tokenizer, train_split="train_prefs", val_split="test_prefs", test_split=None
    )
    assert (len(dm.train_dataset), len(dm.val_dataset), dm.test_dataset) == (5, 2, None)


# --------------------------------------------------------------------------------- 5: CSV text


def test_csv_cells_are_text_as_written(tokenizer, tmp_path):
    """'4' and '5' are answers, not numbers; 'NA' and 'None' are words; "" is an empty answer
    (EOS alone, counted), and an empty prompt cell an empty prompt (refused)."""
    path = tmp_path / "pairs.csv"
    path.write_text(
        "prompt,chosen,rejected\nWhat is 2+2?,4,5\nSay a word,NA,None\nSay nothing,,no\n"
    )
    dm = built(str(path), tokenizer, val_fraction=0)
    assert decoded(tokenizer, dm, "chosen_input_ids") == ["4</s>", "NA</s>", "</s>"]
    assert dm.stats["train"]["empty_completions"] == 1
    path.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nSay a word,NA,None\n,yes,no\n")
    with pytest.raises(ValueError) as raised:
        built(str(path), tokenizer, val_fraction=0)
    assert str(raised.value).splitlines()[:2] == [
        f"{path}: split 'train': 1 of 3 rows cannot be trained on:",
        "  row 3: 'prompt' is empty",
    ]
    path.write_text("\ufeffprompt,chosen,rejected\nWhat is 2+2?,4,5\nSay a word,NA,None\n")
    dm = built(str(path), tokenizer, val_fraction=0)  # a spreadsheet's byte-order mark too
    assert decoded(tokenizer, dm, "chosen_input_ids") == ["4</s>", "NA</s>"]
    assert decoded(tokenizer, dm, "rejected_input_ids") == ["5</s>", "None</s>"]


def test_csv_files_of_one_split_must_share_columns(tokenizer, tmp_path):
    (tmp_path / "train-0.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    (tmp_path / "train-1.csv").write_text("prompt,chosen\na,b\n")
    with pytest.raises(ValueError, match=r"train-1\.csv: columns \['prompt', 'chosen'\] differ"):
        built(str(tmp_path), tokenizer)


def test_a_csv_file_given_on_the_command_line_is_read_as_a_path(tiny_model_dir, tmp_path, capsys):
    """jsonargparse read a file path given for `dataset` as a config: the CSV's text became the
    dataset name ("File name too long: 'prompt,chosen,rejected..."). It stays the path, and fits."""
    from lit_dpo.cli import main

    csv = tmp_path / "pairs.csv"
    rows = "".join(f"Review film {i}:, a delight., boring.\n" for i in range(16))
    csv.write_text("prompt,chosen,rejected\n" + rows)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.dataset", str(csv)]
    args += ["--model.model_name_or_path", tiny_model_dir]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    assert f"dataset: {csv}\n" in capsys.readouterr().out
    main([*args, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert list((tmp_path / "run").rglob("model.safetensors"))


# ------------------------------------------------------------ 6, 7: JSON that is not JSON Lines


def test_a_json_array_saved_as_jsonl_names_the_right_lines(tokenizer, tmp_path):
    """A pretty-printed array in a .jsonl file is read as the array it is, and each row is
    named by the line it starts on (7 lines per row here), in errors and in the rejects file."""
    rows = [PAIR, PAIR, {**PAIR, "prompt": ""}]
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(rows, indent=2))
    with pytest.raises(ValueError, match=r"\n  line 12: 'prompt' is empty\n"):
        built(str(path), tokenizer, val_fraction=0)
    rejects = tmp_path / "rejects.jsonl"
    built(str(path), tokenizer, val_fraction=0, on_bad_rows="skip", rejects_path=str(rejects))
    assert json.loads(rejects.read_text())["where"] == "line 12"
    assert path.read_text().splitlines()[11].strip() == "{"


def test_pretty_printed_objects_in_jsonl_are_named_by_their_first_line(tokenizer, tmp_path):
    """Objects spanning lines, one after another (the loader reads them): a bad row, or a
    broken object, is named by the line it is on, not by counting non-blank lines."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r, indent=2) for r in [PAIR, {**PAIR, "prompt": ""}]))
    with pytest.raises(ValueError, match=r"\n  line 6: 'prompt' is empty\n"):
        built(str(path), tokenizer, val_fraction=0)
    path.write_text(json.dumps(PAIR, indent=2) + '\n{\n  "prompt": "a",\n  "chosen" "b"\n}\n')
    with pytest.raises(ValueError) as raised:
        built(str(path), tokenizer, val_fraction=0)
    assert str(raised.value) == (
        f"{path}: 1 bad line: line 8: not valid JSON (Expecting ':' delimiter, column 12)"
    )


def test_a_lone_surrogate_names_file_line_and_field(tokenizer, tmp_path):
    """A "\\ud800" escape is valid JSON but no text: Arrow refused the file without a word."""
    path = tmp_path / "chat.json"
    path.write_text(
        "[\n"
        + r'{"prompt": [{"role": "user", "content": "Hi"}], '
        + r'"chosen": [{"role": "assistant", "content": "Pa\udc00ris"}], '
        + r'"rejected": [{"role": "assistant", "content": "Lyon"}]}'
        + "\n]\n"
    )
    with pytest.raises(ValueError) as raised:
        built(str(path), tokenizer)
    assert str(raised.value) == (
        f"{path}: 1 bad line: line 2: 'chosen'[0]['content'] holds a lone UTF-16 surrogate "
        f"('\\udc00'), which is not text: remove it, or escape the whole character (a surrogate "
        f"pair)"
    )


# ------------------------------------------------------ 8: UltraFeedback-binarized, as shipped


def ultrafeedback_row(prompt: str, chosen: str, rejected: str, scores=(8.5, 6.25)) -> dict:
    """One row in the schema of HuggingFaceH4/ultrafeedback_binarized (train_prefs/test_prefs):
    field order, message key order (content, role) and types as published."""
    user = {"content": prompt, "role": "user"}
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "chosen": [user, {"content": chosen, "role": "assistant"}],
        "rejected": [user, {"content": rejected, "role": "assistant"}],
        "messages": [user, {"content": chosen, "role": "assistant"}],
        "score_chosen": scores[0],
        "score_rejected": scores[1],
    }


UF_ROWS = [
    ultrafeedback_row(
        "how can i develop a habit of drawing daily",
        "Start small: ten minutes a day, same time, one sketchbook.",
        "As an AI language model, I cannot draw.",
    ),
    ultrafeedback_row("Name the capital of France.", "Paris.", "Lyon.", (10.0, 2.0)),
    ultrafeedback_row("Hi", "Hello! How can I help?", "What?", (7.0, 7.0)),
]


def test_ultrafeedback_binarized_rows_load_unchanged(tokenizer, tmp_path):
    """Parquet shards named as the Hub ships them, every column kept: the same tokens as the
    same conversations as prompt/chosen/rejected messages, and as TRL implicit-prompt rows."""
    for split, rows in [("train_prefs", UF_ROWS), ("test_prefs", UF_ROWS[:2])]:
        datasets.Dataset.from_list(rows).to_parquet(tmp_path / f"{split}-00000-of-00001.parquet")
    dm = built(str(tmp_path), tokenizer, train_split="train_prefs", val_split="test_prefs")
    assert dm.formats == {"train_prefs": "conversation", "test_prefs": "conversation"}
    assert dm.pairs and len(dm.val_dataset) == 2
    standard = [
        {"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
        for r in UF_ROWS
    ]
    implicit = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in UF_ROWS]
    for rows in (standard, implicit):
        other = built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0)
        assert other.train_dataset.to_list() == dm.train_dataset.to_list()


def test_ultrafeedback_row_whose_prompt_is_not_in_its_conversations(tokenizer):
    rows = [UF_ROWS[0], {**UF_ROWS[1], "prompt": "Name the capital of Italy."}]
    with pytest.raises(ValueError, match="row 2: 'prompt' is not the last user message that"):
        built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0)


# ------------------------------------------------------------------------- 9: paths mistyped


def test_a_mistyped_local_path_offline_is_not_found_with_close_names(
    tokenizer, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "sentiment").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "sentiment" / "train.jsonl", [PAIR])
    with pytest.raises(FileNotFoundError) as raised:
        built("data/sentimnet", tokenizer)
    assert str(raised.value) == (
        "dataset file or directory not found: data/sentimnet (did you mean data/sentiment?)"
    )
    with pytest.raises(ValueError) as raised:  # no separator: a Hub name, but the Hub is offline
        built("dta", tokenizer)
    assert str(raised.value) == (
        "dataset file or directory not found: dta (did you mean data?); could not load dataset "
        "'dta' from the Hub either (HF_HUB_OFFLINE is set, and it is not in the cache)"
    )


def test_gzipped_json_lines_as_published(tokenizer, tmp_path):
    """Anthropic-HH ships test.jsonl.gz: read through gzip, rows still named by line."""
    path = tmp_path / "test.jsonl.gz"
    with HH.open("rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.write(b'{"chosen": "same", "rejected": "same"}\n')
    with pytest.raises(ValueError, match=r"\n  line 7: 'chosen' is identical to 'rejected'\n"):
        built(str(path), tokenizer, val_fraction=0)


# ---------------------------------------------------------------------- 10: unpaired rows


def test_kto_rows_are_refused_for_any_training(tokenizer, tmp_path):
    """prompt/completion/label (TRL's unpaired preference rows) read as SFT completions trained
    DPO to nothing (chosen = rejected, loss ln 2) and SFT on the undesirable answers too."""
    rows = [
        {"prompt": "The movie", "completion": " was wonderful", "label": True},
        {"prompt": "The movie", "completion": " was terrible", "label": False},
    ]
    source = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(ValueError) as raised:
        built(source, tokenizer, val_fraction=0)
    assert str(raised.value) == (
        f"{source}: split 'train': unpaired prompt/completion rows with a 'label' column "
        f"(KTO-style): lit_dpo trains on pairs (prompt/chosen/rejected) with DPOModule or on "
        f"completions with SFTModule; pair each prompt's desirable and undesirable completions "
        f"as chosen and rejected, or keep only the desirable rows and drop 'label' for SFT"
    )


def test_completion_rows_with_a_category_label_train(tokenizer):
    """A 'label' that is no true/false preference (a topic) is just another column."""
    rows = [{"prompt": "2+2=", "completion": "4", "label": "math"}] * 2
    assert len(built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0).train_dataset)


def test_the_data_module_says_whether_it_holds_pairs(tokenizer, tmp_path):
    """What DPOModule reads at setup: `formats` per split, `pairs`, and `require_pairs()`."""
    pairs = built(datasets.Dataset.from_list([PAIR] * 4), tokenizer, val_fraction=0.25)
    assert pairs.formats == {"train": "pair"} and pairs.pairs
    pairs.require_pairs()  # nothing to say
    rows = [{"prompt": "The movie", "completion": " was wonderful"}] * 2
    sft = built(write_jsonl(tmp_path / "sft.jsonl", rows), tokenizer, val_fraction=0)
    assert sft.formats == {"train": "completion"} and not sft.pairs
    with pytest.raises(ValueError) as raised:
        sft.require_pairs()
    assert str(raised.value) == (
        f"{tmp_path / 'sft.jsonl'}: split 'train': holds prompt/completion rows, not pairs: DPO "
        f"needs pairs (prompt/chosen/rejected); use SFTModule for completions"
    )


def test_a_file_of_yours_at_rejects_path_is_refused_untouched(tokenizer, tmp_path):
    """Under skip the rejects file is replaced run after run, but only a rejects file: a file
    of the user's at that path stops the run before it is touched."""
    rows = [PAIR, {**PAIR, "rejected": PAIR["chosen"]}, {**PAIR, "prompt": "Film 2"}]  # 2: a tie
    source = str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    rejects = tmp_path / "rejects.jsonl"
    for _ in range(2):  # a second run replaces the first run's rejects file
        built(source, tokenizer, val_fraction=0, on_bad_rows="skip", rejects_path=str(rejects))
        (record,) = [json.loads(line) for line in rejects.read_text().splitlines()]
        assert record["row"] == 2
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "notes"}\n')
    with pytest.raises(FileExistsError, match=r"notes.jsonl exists and is not a rejects file"):
        built(source, tokenizer, val_fraction=0, on_bad_rows="skip", rejects_path=str(notes))
    assert notes.read_text() == '{"my": "notes"}\n'
