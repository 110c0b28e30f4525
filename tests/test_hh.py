"""The HH experiment (experiments/hh): the hashed split of the published file, the accuracy and
bootstrap on hand-made margins, and the whole run on a tiny model and a handful of HH rows, a
second time from its saved points."""

import csv
import gzip
import json
import random

import numpy as np
import pytest

from experiments.hh import evaluation, split
from experiments.hh import run as hh

SOURCE, SPLIT_DIR = split.SOURCE, split.SPLIT_DIR


@pytest.fixture(scope="module")
def lines():
    with gzip.open(SOURCE, "rb") as f:
        return [line for line in f if line.strip()]


def as_sets(parts):
    return {name: set(rows) for name, rows in parts.items()}


def test_split_is_disjoint_complete_and_independent_of_row_order(lines):
    parts = split.split_lines(lines)
    assert sum(map(len, parts.values())) == len(lines) == 2312
    sets = as_sets(parts)
    assert not (sets["train"] & sets["test"] or sets["train"] & sets["validation"])
    assert not sets["validation"] & sets["test"]
    assert len(parts["test"]) >= 400
    shuffled = lines[:]
    random.Random(0).shuffle(shuffled)
    assert as_sets(split.split_lines(shuffled)) == sets
    # Within a split the published order is kept.
    position = {line: i for i, line in enumerate(lines)}
    assert all(
        [position[x + b"\n"] for x in part] == sorted(position[x + b"\n"] for x in part)
        for part in parts.values()
    )


def test_duplicates_and_shared_openings_stay_in_one_split(lines):
    """A duplicated row, and rows that open with the same Human turn, land in one split."""
    opener = "\n\nHuman: How do I pick a lock?"
    rows = [
        {"chosen": f"{opener}\n\nAssistant: I can't help with that {i}.", "rejected": f"Sure {i}"}
        for i in range(20)
    ]
    extra = [json.dumps(r).encode() + b"\n" for r in rows]
    parts = split.split_lines(lines + [lines[5], lines[5]] + extra)
    homes = {name for name, part in parts.items() if lines[5].rstrip(b"\n") in part}
    assert len(homes) == 1 and sum(p.count(lines[5].rstrip(b"\n")) for p in parts.values()) == 3
    assert len({split.assign(r) for r in rows}) == 1


def test_the_committed_split_files_are_what_split_writes(tmp_path):
    counts = split.split(str(SOURCE), str(tmp_path))
    for name in split.SPLITS:
        committed = (SPLIT_DIR / f"{name}.jsonl.gz").read_bytes()
        assert committed == (tmp_path / f"{name}.jsonl.gz").read_bytes(), name
        assert len(split.read_rows(SPLIT_DIR / f"{name}.jsonl.gz")) == counts[name]
    assert counts["test"] >= 400


def test_the_data_module_reads_the_split_directory(tokenizer, tmp_path):
    from lit_dpo.data import PreferenceDataModule

    dm = PreferenceDataModule(
        str(SPLIT_DIR), tokenizer=tokenizer, max_length=96, max_prompt_length=48,
        on_bad_rows="skip", rejects_path=str(tmp_path / "rejects.jsonl"),
    )  # fmt: skip
    dm.setup("fit")
    assert set(dm.formats.values()) == {"implicit"}
    for name, rows in [("train", dm.train_dataset), ("validation", dm.val_dataset),
                       ("test", dm.test_dataset)]:  # fmt: skip
        n = len(split.read_rows(SPLIT_DIR / f"{name}.jsonl.gz"))
        # Only pairs whose replies are identical once cut to max_length are skipped.
        assert len(rows) + dm.stats[name]["skipped"] == n
        assert dm.stats[name]["skipped"] < 0.01 * n


# -- accuracy and bootstrap --------------------------------------------------------------------


def test_accuracy_of_hand_made_margins():
    """Margins (1, -1, 0, 2): right, wrong, a tie (1/2), right -> accuracy 2.5 / 4 = 0.625."""
    margins = [1.0, -1.0, 0.0, 2.0]
    assert evaluation.pair_correct(margins).tolist() == [1.0, 0.0, 0.5, 1.0]
    acc, low, high = evaluation.accuracy_with_ci(margins, n_resamples=2000, seed=0)
    assert acc == 0.625 and low <= acc <= high
    assert (acc, low, high) == evaluation.accuracy_with_ci(margins, n_resamples=2000, seed=0)
    # Every resample of 4 pairs has a mean in {0, 1/8, ..., 1}, and so has each percentile.
    assert low * 8 == int(low * 8) and high * 8 == int(high * 8)


def test_bootstrap_interval_matches_the_normal_approximation():
    """70 right of 100: the percentile interval is close to 0.7 +- 1.96 sqrt(0.7 * 0.3 / 100)
    = [0.610, 0.790]; it is the same for a seed and another for another seed."""
    margins = [1.0] * 70 + [-1.0] * 30
    acc, low, high = evaluation.accuracy_with_ci(margins, n_resamples=10_000, seed=0)
    assert acc == pytest.approx(0.7)
    assert low == pytest.approx(0.610, abs=0.015) and high == pytest.approx(0.790, abs=0.015)
    assert evaluation.accuracy_with_ci(margins, n_resamples=10_000, seed=0) == (acc, low, high)
    other = evaluation.bootstrap_means(evaluation.pair_correct(margins), 500, seed=1)
    assert not np.array_equal(
        other, evaluation.bootstrap_means(evaluation.pair_correct(margins), 500, seed=0)
    )
    # All-right and all-tied margins: a degenerate interval.
    assert evaluation.accuracy_with_ci([3.0] * 5, 100) == (1.0, 1.0, 1.0)
    assert evaluation.accuracy_with_ci([0.0] * 5, 100) == (0.5, 0.5, 0.5)


def test_accuracy_table_pairs_the_resamples():
    """Against itself a method differs by exactly 0 in every resample; the table's own interval
    is the single-method one (the same seeded resamples)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 200), rng.normal(0.0, 1, 200)
    table = evaluation.accuracy_table({"a": a, "b": b, "a2": a.copy()}, "a", 3000, seed=7)
    rows = {r["method"]: r for r in table}
    assert rows["a2"]["diff"] == 0 and (rows["a2"]["diff_ci_low"], rows["a2"]["diff_ci_high"]) == (
        0,
        0,
    )
    assert "diff" not in rows["a"]
    assert (rows["a"]["accuracy"], rows["a"]["ci_low"], rows["a"]["ci_high"]) == (
        evaluation.accuracy_with_ci(a, 3000, seed=7)
    )
    assert rows["b"]["diff"] == pytest.approx(rows["b"]["accuracy"] - rows["a"]["accuracy"])


# -- the experiment end to end ---------------------------------------------------------------


def write_split(directory, rows):
    directory.mkdir()
    for name, part in rows.items():
        data = "".join(json.dumps(r) + "\n" for r in part).encode()
        (directory / f"{name}.jsonl.gz").write_bytes(split.gzip_bytes(data))
    return str(directory)


def test_the_experiment_runs_end_to_end_and_reuses_its_points(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Four methods trained 2 steps on 4 real HH pairs of a tiny Llama, evaluated on 6 held-out
    pairs; every margin in margins.csv is recomputed from the saved log-probs; a second run
    trains nothing and gives the same report; other settings are refused, not mixed in."""
    rows = split.read_rows(SPLIT_DIR / "train.jsonl.gz", 12)
    data = write_split(tmp_path / "split", {"train": rows[:4], "validation": rows[4:6],
                                            "test": rows[6:12]})  # fmt: skip
    out = tmp_path / "out"
    settings = dict(
        out_dir=str(out), model=tiny_model_dir, data=data, steps=2, batch_size=2, n_val=2,
        max_length=64, max_prompt_length=32, n_prompts=2, max_new_tokens=4, eval_batch_size=4,
        n_resamples=200, progress=False,
    )  # fmt: skip
    summary = hh.run(**settings)
    points = sorted(p.stem for p in (out / "points").glob("*.json"))
    assert points == ["dpo_ipo", "dpo_sigmoid", "preferred_ft", "reference", "reward_model"]
    methods = ["dpo_sigmoid", "dpo_ipo", "preferred_ft", "reward_model", "reference_logp", "length"]
    assert [r["method"] for r in summary["accuracies"]] == methods
    assert all(r["pairs"] == 6 and 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1
               for r in summary["accuracies"])  # fmt: skip
    assert summary["train"]["dpo_sigmoid"]["steps"] == 2
    assert summary["train"]["reward_model"]["pairs"] == 4
    assert "val/rewards/accuracies" in summary["train"]["reward_model"]
    for name in ("accuracies.csv", "margins.csv", "samples.csv", "summary.json"):
        assert (out / name).is_file()
    pytest.importorskip("matplotlib")
    assert (out / "accuracies.png").is_file() and (out / "margins.png").is_file()

    # The margins, from the points by hand: beta * (log-ratio sums), IPO on per-token means.
    load = lambda name: json.loads((out / "points" / f"{name}.json").read_text())  # noqa: E731
    ref, dpo, ipo, rm = (
        load("reference"),
        load("dpo_sigmoid"),
        load("dpo_ipo"),
        load("reward_model"),
    )
    with open(out / "margins.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    for i, row in enumerate(table):
        rc, rr = ref["logps"]["chosen"][i], ref["logps"]["rejected"][i]
        nc, nr = ref["test"]["chosen_tokens"][i], ref["test"]["rejected_tokens"][i]
        dc, dr = dpo["logps"]["chosen"][i], dpo["logps"]["rejected"][i]
        ic, ir = ipo["logps"]["chosen"][i], ipo["logps"]["rejected"][i]
        expected = {
            "dpo_sigmoid": 0.1 * ((dc - rc) - (dr - rr)),
            "dpo_ipo": 0.1 * ((ic - rc) / nc - (ir - rr) / nr),
            "reward_model": rm["rewards"]["chosen"][i] - rm["rewards"]["rejected"][i],
            "reference_logp": rc - rr,
            "length": ref["test"]["chosen_chars"][i] - ref["test"]["rejected_chars"][i],
        }
        for k, v in expected.items():
            assert float(row[k]) == pytest.approx(v, abs=1e-5), (i, k)
    with open(out / "samples.csv") as f:
        samples = list(csv.DictReader(f))
    assert [s["test_row"] for s in samples] == ["0", "1"]
    assert samples[0]["prompt"].rstrip().endswith("Assistant:")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was measured again")

    monkeypatch.setattr(hh, "measure", no_training)
    capsys.readouterr()
    again = hh.run(**settings)
    assert again["accuracies"] == summary["accuracies"]
    assert capsys.readouterr().out.count("done before, reused") == 5
    with pytest.raises(ValueError, match="steps 2 -> 3"):
        hh.run(**settings | {"steps": 3})
