"""benchmarks/trl_compare.py runs end to end on a 2-layer model and reports sane numbers.

Only that the harness works is checked, never how fast anything is (timings belong in the
benchmark's own output, not in assertions).
"""

import importlib.util
import json

from transformers import AutoTokenizer

from benchmarks.data import make_pairs
from benchmarks.trl_compare import main

RATES = ("median_step_s", "pairs_per_s", "tokens_per_s", "useful_gflops", "peak_rss_gib")


def test_pairs_are_deterministic_distinct_and_fit(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = make_pairs(tokenizer, 12, max_length=64, seed=3)
    assert rows == make_pairs(tokenizer, 12, max_length=64, seed=3)
    assert rows != make_pairs(tokenizer, 12, max_length=64, seed=4)
    for row in rows:
        assert row["chosen"] != row["rejected"]
        prompt = len(tokenizer(row["prompt"])["input_ids"])
        for key in ("chosen", "rejected"):
            completion = len(tokenizer(row[key], add_special_tokens=False)["input_ids"])
            assert completion >= 1 and prompt + completion + 1 <= 64  # + EOS


def run(tmp_path, model_dir, variants, *more):
    out = tmp_path / "bench.json"
    argv = ["--model", model_dir, "--variants", variants, "--warmup", "1", "--steps", "2", *more]
    argv += ["--matmul-size", "256", "--out", str(out)]
    report = main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report


def check(result, steps=2):
    assert "error" not in result, result.get("log_tail")
    assert result["timed_steps"] == steps
    assert all(result[key] > 0 for key in RATES), {k: result[k] for k in RATES}
    assert result["fraction_of_peak"] > 0  # a tiny model vs a small matmul: may exceed 1
    assert 0 <= result["padding_fraction"] < 1
    assert result["threads"] == [2]


def test_lit_dpo_against_trl(tmp_path, tiny_model_dir, capsys):
    """lit_dpo's online variant, and TRL's DPOTrainer beside it when trl is installed."""
    with_trl = importlib.util.find_spec("trl") is not None
    report = run(tmp_path, tiny_model_dir, "online,trl" if with_trl else "online")
    online = report["results"]["online"]
    check(online)
    printed = capsys.readouterr().out
    assert printed.startswith("command: ")
    if not with_trl:
        return
    trl = report["results"]["trl"]
    check(trl)
    assert online["params"] == trl["params"]
    # the same pairs in the same order: identical batches, step by step
    assert [s["shape"] for s in online["steps"]] == [s["shape"] for s in trl["steps"]]
    assert [s["real_tokens"] for s in online["steps"]] == [s["real_tokens"] for s in trl["steps"]]
    (ratio,) = report["ratios"]["online"]
    assert ratio["vs"] == "trl" and ratio["pairs_per_s"] > 0
    assert "online / trl: pairs/s x" in printed


def test_uniform_lengths_and_the_default_variant(tmp_path, tiny_model_dir):
    """--shape uniform: prompts and replies of similar length; `default` (packing auto) packs no
    batch there, since none would fit in fewer rows, while `packed` packs every one."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = make_pairs(
        tokenizer, 8, max_length=128, prompt_tokens=(44, 52), completion_tokens=(64, 72)
    )
    lengths = [len(tokenizer(r["prompt"] + r["chosen"])["input_ids"]) for r in rows]
    assert max(lengths) - min(lengths) < 20
    report = run(tmp_path, tiny_model_dir, "default,packed", "--shape", "uniform")
    default, packed = report["results"]["default"], report["results"]["packed"]
    check(default), check(packed)
    assert default["packed_steps"] == 0 and packed["packed_steps"] == 1
    assert report["config"]["shape"] == "uniform"
