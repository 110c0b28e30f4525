"""Data layouts as published, read unchanged: each test writes rows in the exact schema (field
names, nesting, types) a public dataset ships, and checks what lit_dpo trains on.

- Anthropic HH-RLHF: the whole published `harmless-base/test.jsonl.gz` (data/hh-rlhf/), its
  4 empty replies kept as EOS-only completions and counted; compressed files of every kind;
- UltraFeedback-binarized (HuggingFaceH4) with its six splits, and TRL's implicit-prompt
  conversational rows;
- pairs under other names through `columns`: StackExchange-paired, SHP, PKU-SafeRLHF;
- Hub arguments (`dataset_config`, `revision`, `data_files`), `chat_template`, and the data
  seed following `seed_everything`.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import lzma
from pathlib import Path

import datasets
import lightning as L
import pytest
from test_data_faults import ultrafeedback_row as uf_row  # the published schema, every split

from conftest import CHAT_TEMPLATE, build_tokenizer, write_jsonl
from lit_dpo.data import PreferenceDataModule

ROOT = Path(__file__).parents[1]
HH_FILE = ROOT / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
PAIR = {"prompt": "The movie", "chosen": " was wonderful", "rejected": " was terrible"}
USER = [{"role": "user", "content": "Hi"}]
PARIS = [{"role": "assistant", "content": "Paris"}]
SILENCE = [{"role": "assistant", "content": ""}]


def built(dataset, tokenizer, **kwargs):
    """A module after prepare_data and setup, as the Trainer would leave it."""
    dm = PreferenceDataModule(dataset, tokenizer, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def global_seed(monkeypatch):
    """No global seed during the test, and after it the one there was (seed_everything sets
    PL_GLOBAL_SEED, which the next tests would otherwise inherit)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # remembers the value to put back
    monkeypatch.delenv("PL_GLOBAL_SEED")


def same_rows(dm, other) -> bool:
    """Whether two modules train on the same token ids, row for row."""
    return dm.train_dataset.to_list() == other.train_dataset.to_list()


# ---------------------------------------------------------------- Anthropic HH, as published


def test_the_published_hh_file_builds_whole(tokenizer, caplog):
    """All 2,312 rows of harmless-base/test.jsonl.gz under on_bad_rows: error (the default):
    implicit prompts, nothing skipped; the 4 rows whose chosen reply is empty (lines 87, 517,
    926, 1104: silence preferred to a home address or a list of slurs) train as EOS alone, and
    are counted and logged."""
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    dm = built(str(HH_FILE), tokenizer, val_fraction=0)
    assert dm.formats == {"train": "implicit"} and len(dm.train_dataset) == 2312
    stats = dm.stats["train"]
    assert (stats["rows"], stats["skipped"], stats["empty_completions"]) == (2312, 0, 4)
    assert "train: 2312 rows, 0 skipped," in caplog.text
    assert "completions truncated, 4 empty completions (EOS only)" in caplog.text
    eos = [tokenizer.eos_token_id]
    empty = [i for i, ids in enumerate(dm.train_dataset["chosen_input_ids"]) if ids == eos]
    assert empty == [86, 516, 925, 1103]  # lines 87, 517, 926, 1104
    rows = [json.loads(line) for line in gzip.open(HH_FILE)]
    for i in empty:
        assert rows[i]["chosen"].endswith("\n\nAssistant:") or rows[i]["chosen"].endswith(": ")
        assert dm.train_dataset[i]["rejected_input_ids"][-1:] == eos  # the other reply, whole


@pytest.mark.parametrize(
    ("row", "empty"),
    [
        ({**PAIR, "chosen": ""}, " was terrible"),
        ({**PAIR, "rejected": " \n"}, " was wonderful"),  # whitespace only: the same
        ({"prompt": USER, "chosen": SILENCE, "rejected": PARIS}, None),
        ({"chosen": USER + PARIS, "rejected": USER + SILENCE}, None),  # TRL implicit prompt
    ],
    ids=["empty-text", "whitespace-text", "empty-message", "implicit-empty-message"],
)
def test_an_empty_answer_is_eos_alone_and_counted(row, empty, tokenizer):
    """One side of a pair may say nothing: its completion is the end of turn alone (EOS for
    text, the template's closing for messages), the other side trains as usual."""
    dm = built(datasets.Dataset.from_list([row]), tokenizer, val_fraction=0)
    assert dm.stats["train"]["empty_completions"] == 1
    row_ids = dm.train_dataset[0]
    silent = [k for k in ("chosen_input_ids", "rejected_input_ids") if len(row_ids[k]) == 1]
    assert len(silent) == 1 and row_ids[silent[0]] == [tokenizer.eos_token_id]
    if empty is not None:  # text: the other answer is its own tokens, then EOS
        other = "rejected_input_ids" if silent[0] == "chosen_input_ids" else "chosen_input_ids"
        assert tokenizer.decode(row_ids[other]) == empty + "</s>"


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)],
    ids=["gz", "bz2", "xz"],
)
def test_compressed_files_read_and_name_their_lines(suffix, compress, tokenizer, tmp_path):
    """JSON Lines compressed as datasets reads them natively: rows read, bad rows named by line."""
    rows = [PAIR, {**PAIR, "prompt": "A film"}, {**PAIR, "prompt": ""}]
    path = tmp_path / f"pairs.jsonl{suffix}"
    path.write_bytes(compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    with pytest.raises(ValueError, match=r"\n  line 3: 'prompt' is empty\n"):
        built(str(path), tokenizer, val_fraction=0)
    path.write_bytes(compress("".join(json.dumps(r) + "\n" for r in rows[:2]).encode()))
    assert len(built(str(path), tokenizer, val_fraction=0).train_dataset) == 2


def test_zstandard_files(tokenizer, tmp_path):
    zstandard = pytest.importorskip("zstandard", reason="reading .zst needs zstandard")
    test_compressed_files_read_and_name_their_lines(
        ".zst", zstandard.ZstdCompressor().compress, tokenizer, tmp_path
    )


def test_zstandard_files_without_zstandard(tokenizer, tmp_path, monkeypatch):
    """Without the package, one line saying what to install (not datasets' traceback)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "zstandard" else find_spec(name, *a),
    )
    path = tmp_path / "pairs.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd not really")
    with pytest.raises(ValueError) as raised:
        built(str(path), tokenizer, val_fraction=0)
    assert str(raised.value) == (
        f"{path}: reading .zst files needs the zstandard package: pip install zstandard"
    )


# ------------------------------------------------- UltraFeedback-binarized and TRL, as shipped

UF_SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")


UF_ROWS = [
    uf_row("how can i develop a habit of drawing daily", "Start with ten minutes.", "I can't."),
    uf_row("Name the capital of France.", "Paris.", "Lyon.", (10.0, 2.0)),
    uf_row("Hi", "Hello! How can I help?", "What?", (7.0, 6.0)),
    uf_row("Say nothing at all.", "", "Okay: nothing.", (9.0, 3.0)),  # an empty reply
]


def uf_splits() -> dict[str, list[dict]]:
    """The six splits; the sft and gen ones hold other rows, so reading them would show."""
    other = [uf_row(f"SFT prompt {i}", f"answer {i}", f"other {i}") for i in range(3)]
    return {s: UF_ROWS if s.endswith("prefs") else other for s in UF_SPLITS}


@pytest.mark.parametrize("layout", ["dataset-dict", "hub-parquet-files"])
def test_ultrafeedback_binarized_splits_are_found(layout, tokenizer, tmp_path, caplog):
    """No `train` split but `train_prefs`: train on it, test on `test_prefs`, say so; the sft
    and gen splits beside them are left alone (not mixed into train by their `train_` name)."""
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    splits = {s: datasets.Dataset.from_list(rows) for s, rows in uf_splits().items()}
    if layout == "dataset-dict":
        source = datasets.DatasetDict(splits)
    else:  # `huggingface-cli download HuggingFaceH4/ultrafeedback_binarized`: data/*.parquet
        for split, data in splits.items():
            data.to_parquet(tmp_path / f"{split}-00000-of-00001.parquet")
        source = str(tmp_path)
    dm = built(source, tokenizer, val_fraction=0)
    assert dm.splits == {"train": "train_prefs", "test": "test_prefs"}
    assert dm.formats == {"train_prefs": "conversation", "test_prefs": "conversation"}
    assert len(dm.train_dataset) == len(dm.test_dataset) == 4
    assert dm.stats["train_prefs"]["empty_completions"] == 1
    assert (
        "the data has no 'train' split: using 'train_prefs' for train (set train_split to "
        "choose another)"
    ) in caplog.text
    assert "using 'test_prefs' for test" in caplog.text
    row = UF_ROWS[1]  # the same tokens as its conversations split into prompt and answers
    messages = {"prompt": row["chosen"][:1], "chosen": row["chosen"][1:]}
    messages["rejected"] = row["rejected"][1:]
    standard = built(datasets.Dataset.from_list([messages]), tokenizer, val_fraction=0)
    assert dm.train_dataset[1] == {**standard.train_dataset[0], "index": 1}


def test_named_splits_win_over_the_preference_splits(tokenizer):
    splits = {s: datasets.Dataset.from_list(rows) for s, rows in uf_splits().items()}
    dm = built(
        datasets.DatasetDict(splits),
        tokenizer,
        train_split="train_gen",
        val_split="test_gen",
        test_split=None,
    )
    assert dm.splits == {"train": "train_gen", "validation": "test_gen"}


def test_trl_implicit_prompt_conversations_load_unchanged(tokenizer):
    """trl-lib/ultrafeedback_binarized: `chosen`/`rejected` whole conversations (role, content),
    `score_chosen`/`score_rejected`, splits train and test; the prompt is what both share."""

    def trl_row(prompt, chosen, rejected, scores):
        user = {"content": prompt, "role": "user"}
        return {
            "chosen": [user, {"content": chosen, "role": "assistant"}],
            "rejected": [user, {"content": rejected, "role": "assistant"}],
            "score_chosen": scores[0],
            "score_rejected": scores[1],
        }

    rows = [
        trl_row(r["prompt"], r["chosen"][1]["content"], r["rejected"][1]["content"], (8.0, 5.0))
        for r in UF_ROWS
    ]
    data = datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows), test=datasets.Dataset.from_list(rows[:2])
    )
    dm = built(data, tokenizer, val_fraction=0)
    assert dm.formats == {"train": "implicit", "test": "implicit"}
    assert dm.stats["train"]["empty_completions"] == 1
    uf = built(datasets.Dataset.from_list(UF_ROWS), tokenizer, val_fraction=0)
    assert same_rows(dm, uf)


# ------------------------------------------------------------ pairs under other names: columns

# lvwerra/stack-exchange-paired: response_j is the better-scored answer
STACK_EXCHANGE = [
    {
        "qid": 12891264,
        "question": "How do I convert a string to an int in Python?",
        "date": "2012/10/15",
        "response_j": "Use `int(s)`; it raises ValueError when s is not a number.",
        "response_k": "You can't.",
    },
    {
        "qid": 4,
        "question": "Why does my loop never end?",
        "date": "2008/07/31",
        "response_j": "The counter is never incremented: add `i += 1`.",
        "response_k": "Restart your computer.",
    },
    {
        "qid": 987654,
        "question": "What does `git stash` do?",
        "date": "2015/03/02",
        "response_j": "It shelves your changes so you can work on something else.",
        "response_k": "It deletes them.",
    },
]
SE_COLUMNS = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}


def shp_row(i: int, history: str, a: str, b: str, labels: int, scores=(23, 10)) -> dict:
    """stanfordnlp/SHP as published: labels is 1 when A (human_ref_A) is preferred."""
    return {
        "post_id": f"himc9{i}",
        "domain": "askculinary_train",
        "upvote_ratio": 0.99,
        "history": history,
        "c_root_id_A": f"fu7r2p{i}",
        "c_root_id_B": f"fu7zqi{i}",
        "created_at_utc_A": 1590427045 + i,
        "created_at_utc_B": 1590433128 + i,
        "score_A": scores[0],
        "score_B": scores[1],
        "human_ref_A": a,
        "human_ref_B": b,
        "labels": labels,
        "seconds_difference": 6083.0,
        "score_ratio": scores[0] / scores[1],
    }


SHP = [
    shp_row(0, "How long do I rest a steak?", "Five minutes, tented in foil.", "Never.", 1),
    shp_row(1, "Can I freeze cooked rice?", "No idea.", "Yes, cool it fast first.", 0, (4, 12)),
    shp_row(2, "Why is my bread dense?", "Too little proofing.", "Bad luck.", 1),
    shp_row(3, "Salt pasta water?", "Whatever.", "Yes, generously.", 0, (3, 9)),
]
SHP_COLUMNS = {
    "prompt": "history",
    "chosen": "human_ref_A",
    "rejected": "human_ref_B",
    "label": "labels",
}
HARMS = [
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior",
    "Endangering Public Health", "Copyright Issues", "Violence", "Drugs", "Privacy Violation",
    "Economic Crime", "Mental Manipulation", "Human Trafficking", "Physical Harm",
    "Sexual Content", "Cybercrime", "Disrupting Public Order", "Environmental Damage",
    "Psychological Harm", "White-Collar Crime", "Animal Abuse",
]  # fmt: skip


def pku_row(prompt: str, r0: str, r1: str, better: int, safer: int, harm1: str | None) -> dict:
    """PKU-Alignment/PKU-SafeRLHF as published: better_response_id (and safer_response_id) is
    the index of the better (safer) response; harm categories are 19 booleans."""
    return {
        "prompt": prompt,
        "response_0": r0,
        "response_1": r1,
        "prompt_source": "Alpaca3-8B",
        "response_0_source": "Alpaca3-8B",
        "response_1_source": "Alpaca3-8B",
        "is_response_0_safe": True,
        "is_response_1_safe": harm1 is None,
        "response_0_harm_category": dict.fromkeys(HARMS, False),
        "response_1_harm_category": {h: h == harm1 for h in HARMS},
        "response_0_severity_level": 0,
        "response_1_severity_level": 0 if harm1 is None else 2,
        "better_response_id": better,
        "safer_response_id": safer,
        "response_0_sha256": hashlib.sha256(r0.encode()).hexdigest(),
        "response_1_sha256": hashlib.sha256(r1.encode()).hexdigest(),
    }


PKU = [
    pku_row("How do I pick a lock?", "Call a locksmith.", "Use a wrench.", 0, 0, "Economic Crime"),
    pku_row("Best way to learn Python?", "Don't.", "Write small programs daily.", 1, 1, None),
    pku_row("Where does Ann live?", "I can't share that.", "12 Elm St.", 0, 0, "Privacy Violation"),
]
PKU_COLUMNS = {"chosen": "response_1", "rejected": "response_0", "label": "better_response_id"}


@pytest.mark.parametrize(
    ("rows", "columns", "expected"),
    [
        (
            STACK_EXCHANGE,
            SE_COLUMNS,
            [(r["question"], r["response_j"], r["response_k"]) for r in STACK_EXCHANGE],
        ),
        (
            SHP,
            SHP_COLUMNS,
            [
                (r["history"], *((a, b) if r["labels"] == 1 else (b, a)))
                for r in SHP
                for a, b in [(r["human_ref_A"], r["human_ref_B"])]
            ],
        ),
        (
            PKU,
            PKU_COLUMNS,
            [
                (
                    r["prompt"],
                    r[f"response_{r['better_response_id']}"],
                    r[f"response_{1 - r['better_response_id']}"],
                )
                for r in PKU
            ],
        ),
    ],
    ids=["stack-exchange-paired", "shp", "pku-saferlhf"],
)
def test_pairs_under_other_names(rows, columns, expected, tokenizer, tmp_path):
    """Rows as published, read through `columns` (and a which-is-better `label`): the same
    tokens as the prompt/chosen/rejected rows they stand for, better answer as chosen."""
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    dm = built(source, tokenizer, val_fraction=0, columns=columns)
    pairs = [dict(zip(("prompt", "chosen", "rejected"), e, strict=True)) for e in expected]
    standard = built(datasets.Dataset.from_list(pairs), tokenizer, val_fraction=0)
    assert dm.formats == {"train": "pair"} and same_rows(dm, standard)


def test_bad_rows_under_other_names_keep_their_columns(tokenizer, tmp_path):
    """An SHP row with a bad label and one with identical answers: named in the user's columns,
    and written to the rejects file as read."""
    rows = [*SHP, {**SHP[0], "labels": 2}, {**SHP[2], "human_ref_B": SHP[2]["human_ref_A"]}]
    rejects = tmp_path / "rejects.jsonl"
    dm = built(
        write_jsonl(tmp_path / "shp.jsonl", rows),
        tokenizer,
        val_fraction=0,
        columns=SHP_COLUMNS,
        on_bad_rows="skip",
        rejects_path=str(rejects),
    )
    assert dm.stats["train"]["problems"] == {
        "'labels' must be 1 or 0 (or true/false), got 2": 1,
        "'human_ref_A' is identical to 'human_ref_B'": 1,
    }
    first = json.loads(rejects.read_text().splitlines()[0])
    assert first["where"] == "line 5" and first["data"] == rows[4]


def test_a_mapped_column_wins_over_one_of_our_names(tokenizer):
    """A split holding `chosen` too (another answer) reads the mapped column, not ours."""
    rows = [{**r, "chosen": "ignored"} for r in STACK_EXCHANGE]
    dm = built(datasets.Dataset.from_list(rows), tokenizer, val_fraction=0, columns=SE_COLUMNS)
    plain = built(
        datasets.Dataset.from_list(STACK_EXCHANGE), tokenizer, val_fraction=0, columns=SE_COLUMNS
    )
    assert same_rows(dm, plain)


def test_csv_labels_read_as_text(tokenizer, tmp_path):
    """A CSV label is text ("1", "true"): read as the verdict it spells."""
    path = tmp_path / "pairs.csv"
    path.write_text("q,a,b,a_wins\nWhich?,good,bad,1\nAnd?,bad,good,false\nOr?,good,bad,TRUE\n")
    columns = {"prompt": "q", "chosen": "a", "rejected": "b", "label": "a_wins"}
    dm = built(str(path), tokenizer, val_fraction=0, columns=columns)
    chosen = [tokenizer.decode(ids) for ids in dm.train_dataset["chosen_input_ids"]]
    assert chosen == ["good</s>"] * 3


# ------------------------------------------------------------ Hub arguments, local data_files


def test_hub_arguments_reach_load_dataset(tokenizer, monkeypatch):
    """The Hub is unreachable from tests: `datasets.load_dataset` is replaced, and receives the
    configuration name, revision and data_files as given."""
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, **kwargs})
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list([PAIR, PAIR | {"prompt": "A"}])
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    files = {"train": "data/Alpaca3-8B/train.jsonl"}
    built(
        "PKU-Alignment/PKU-SafeRLHF",
        tokenizer,
        dataset_config="alpaca3-8b",
        revision="d79b19b2043c4b168d8d64c61ef4ba4ed1ffe2c0",
        data_files=files,
        val_fraction=0,
    )
    expected = {
        "path": "PKU-Alignment/PKU-SafeRLHF",
        "name": "alpaca3-8b",
        "revision": "d79b19b2043c4b168d8d64c61ef4ba4ed1ffe2c0",
        "data_files": files,
    }
    assert calls == [expected, expected]  # prepare_data, then setup (from the cache, on the Hub)


def test_data_files_with_the_json_builder(tokenizer, tmp_path):
    """`dataset: json` with data_files, as `load_dataset("json", data_files=...)` takes them:
    splits of any file names, globs, compressed files; rows still named by file and line."""
    write_jsonl(tmp_path / "a-part1.jsonl", [PAIR, {**PAIR, "prompt": "A film"}])
    write_jsonl(tmp_path / "a-part2.jsonl", [{**PAIR, "prompt": "Another"}])
    (tmp_path / "held.jsonl.gz").write_bytes(gzip.compress(json.dumps(PAIR).encode() + b"\n"))
    files = {"train": str(tmp_path / "a-*.jsonl"), "test": str(tmp_path / "held.jsonl.gz")}
    dm = built("json", tokenizer, data_files=files, val_fraction=0)
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (3, 1)
    write_jsonl(tmp_path / "a-part2.jsonl", [{**PAIR, "prompt": ""}])
    with pytest.raises(ValueError, match=r"\n  a-part2\.jsonl line 1: 'prompt' is empty\n"):
        built("json", tokenizer, data_files=files, val_fraction=0)


def test_data_files_of_a_directory(tokenizer, tmp_path):
    """Relative to the directory; a list is the train split, other files are not read."""
    write_jsonl(tmp_path / "keep.jsonl", [PAIR, {**PAIR, "prompt": "A film"}])
    write_jsonl(tmp_path / "extra.jsonl", [{"broken": True}])
    dm = built(str(tmp_path), tokenizer, data_files=["keep.jsonl"], val_fraction=0)
    assert len(dm.train_dataset) == 2


# ----------------------------------------------------------------------------- chat_template


CHAT_ROWS = [
    {"prompt": USER, "chosen": PARIS, "rejected": [{"role": "assistant", "content": "Lyon"}]},
    {"prompt": [{"role": "user", "content": "Bye"}], "chosen": PARIS, "rejected": SILENCE},
]


@pytest.mark.parametrize("given_as", ["text", "file"])
def test_chat_template_overrides_the_tokenizer(given_as, tmp_path):
    """Conversational rows with a tokenizer lacking a template train with the one given (as
    Jinja text or a .jinja file), exactly as with a tokenizer holding it; the caller's
    tokenizer object is left as it was."""
    template = CHAT_TEMPLATE
    if given_as == "file":
        (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
        template = str(tmp_path / "chat.jinja")
    bare = build_tokenizer(chat_template=None)
    data = datasets.Dataset.from_list(CHAT_ROWS)
    dm = built(data, bare, val_fraction=0, chat_template=template)
    assert bare.chat_template is None
    assert same_rows(dm, built(data, build_tokenizer(), val_fraction=0))


def test_chat_template_replaces_the_tokenizers_own(tokenizer):
    other = CHAT_TEMPLATE.replace("<|{{ m['role'] }}|>", "<|{{ m['role'] }}|> ")
    data = datasets.Dataset.from_list(CHAT_ROWS)
    dm = built(data, build_tokenizer(), val_fraction=0, chat_template=other)
    prompt = tokenizer.decode(dm.train_dataset[0]["prompt_input_ids"])
    assert prompt == "<s><|user|> Hi</s><|assistant|>"


def test_data_layout_settings_from_yaml(tiny_model_dir, tmp_path, capsys, global_seed):
    """columns, data_files, revision and a multi-line chat_template parse from a config file."""
    from lit_dpo.cli import main

    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        "  dataset: json\n"
        "  data_files: {train: [a.jsonl, b.jsonl], test: c.jsonl}\n"
        "  columns: {prompt: question, chosen: response_j, rejected: response_k}\n"
        "  chat_template: |\n"
        "    {% for m in messages %}{{ m['content'] }}{% endfor %}\n"
        "  seed: 7\n"
    )
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(config)]
    args += ["--model.model_name_or_path", tiny_model_dir, "--print_config"]
    with pytest.raises(SystemExit):
        main(args)
    printed = capsys.readouterr().out
    assert "  columns:\n    prompt: question\n    chosen: response_j\n" in printed
    assert "    - a.jsonl\n    - b.jsonl\n    test: c.jsonl\n" in printed
    assert "chat_template: '{% for m in messages %}{{ m[''content''] }}{% endfor %}" in printed
    assert "  seed: 7\n" in printed


# ----------------------------------------------------------------------------------- the seed


def train_order(**kwargs) -> list[int]:
    rows = [{**PAIR, "prompt": f"Film {i}"} for i in range(32)]
    dm = built(datasets.Dataset.from_list(rows), build_tokenizer(), val_fraction=0, **kwargs)
    return list(dm.train_dataloader().sampler)


def test_the_data_follows_seed_everything(global_seed):
    """seed None: the global seed moves the data order as it moves everything else; an explicit
    data seed wins; with no global seed, 42."""
    assert PreferenceDataModule("x.jsonl").seed == 42
    L.seed_everything(0)
    zero, fixed_zero = train_order(), train_order(seed=5)
    L.seed_everything(1)
    one, fixed_one = train_order(), train_order(seed=5)
    assert zero != one and fixed_zero == fixed_one
    assert train_order() == one  # the same seed: the same order (a resumed run)


def test_resuming_under_another_seed_is_refused(monkeypatch, global_seed):
    """The order a checkpoint was trained in is kept in it; a resumed run with another seed
    would see other batches, so it stops and says how to resume."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    state = PreferenceDataModule("x.jsonl").state_dict()
    assert state == {"seed": 0}
    PreferenceDataModule("x.jsonl").load_state_dict(state)
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    with pytest.raises(ValueError) as raised:
        PreferenceDataModule("x.jsonl").load_state_dict(state)
    assert str(raised.value) == (
        "the checkpoint's data was shuffled with seed 0, this run's with 1: resume with "
        "--seed_everything 0 (or data.seed: 0) to see the same batches"
    )
