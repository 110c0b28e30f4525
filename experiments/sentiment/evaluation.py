"""Held-out evaluation of the controlled-sentiment experiment: the reward of a policy's samples,
KL(pi || pi_ref), and the implicit-reward accuracy on held-out pairs; `SentimentEval` runs them
all when fit ends (the main job, configs/sentiment-smollm2.yaml)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback

from experiments.sentiment.pairs import score
from lit_dpo.generation import Sampling, by_prompt, decode, generate
from lit_dpo.utils import (
    atomic_write,
    eval_mode,
    finite_json,
    model_device,
    pad_token_id,
    pairwise_accuracy,
)


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
    over prompts (None for a single prompt), `tokens` (mean completion length), and the
    `samples`, `scores` and `log_ratios` per prompt (lists of `n_samples`).
    """
    from lit_dpo.reward import log_ratios

    sampling = Sampling(n_samples, max_new_tokens, 1.0, 1.0, batch_size, seed)  # pi itself
    prompt_ids, completion_ids = generate(policy, tokenizer, prompts, sampling)
    texts = decode(tokenizer, completion_ids)
    scores = score(texts)
    if reference is None or reference is policy:
        ratios = [0.0] * len(texts)
    else:
        pad = pad_token_id(tokenizer)
        ratios = log_ratios(policy, reference, prompt_ids, completion_ids, pad).tolist()

    def se(values: list[float]) -> float | None:  # standard error of the mean over prompts
        means = [statistics.fmean(v) for v in by_prompt(values, n_samples)]
        return statistics.stdev(means) / len(means) ** 0.5 if len(means) > 1 else None

    return {
        "reward": statistics.fmean(scores),
        "reward_se": se(scores),
        "kl": statistics.fmean(ratios),
        "kl_se": se(ratios),
        "tokens": statistics.fmean(len(c) for c in completion_ids),
        "samples": by_prompt(texts, n_samples),
        "scores": by_prompt(scores, n_samples),
        "log_ratios": by_prompt(ratios, n_samples),
    }


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
        self.results: dict[str, float | None] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.results = self.run(trainer, pl_module)
            if trainer.logger is not None:
                numbers = {f"eval/{k}": v for k, v in self.results.items() if v is not None}
                trainer.logger.log_metrics(numbers, step=trainer.global_step)
                trainer.logger.save()
            print(self.table(self.results))
            out = Path(trainer.log_dir or trainer.default_root_dir) / "sentiment_eval.json"
            atomic_write(out, finite_json(self.results, indent=2) + "\n")  # no NaN: not JSON
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

    device = model_device(policy)
    right, total = 0.0, 0
    with eval_mode(policy, reference):
        for batch in loader:
            if limit is not None and total >= limit:
                break
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            s = sequence_logps(policy, batch).sum - sequence_logps(reference, batch).sum  # (2B,)
            n = len(s) // 2  # padded or packed batch: 2B sequences either way
            right += float(pairwise_accuracy(s[:n] - s[n:]).sum())  # a tie counts half
            total += n
    return right / max(total, 1), total
