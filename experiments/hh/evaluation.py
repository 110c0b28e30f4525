"""Held-out evaluation of the HH experiment: per-pair scores of a model, pairwise accuracy with a
percentile-bootstrap interval over pairs, and the plots.

A method ranks a pair by its margin m = score(chosen) - score(rejected); the pair counts 1 when
m > 0, 0 when m < 0 and 1/2 when m = 0 (a tie: a coin flip, as `rewards/accuracies` counts it).
The accuracy is the mean over pairs; its 95% interval is the 2.5th and 97.5th percentiles of the
accuracies of `n_resamples` resamples of the pairs with replacement. One seeded set of resamples
serves every method, so the difference of two methods gets a (paired) interval the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lit_dpo.utils import pairwise_accuracy


def pair_correct(margins: Sequence[float]) -> np.ndarray:
    """Per pair: 1 (m > 0), 0 (m < 0) or 0.5 (a tie), as float64."""
    return pairwise_accuracy(torch.as_tensor(margins, dtype=torch.float64)).numpy()


def bootstrap_means(values: np.ndarray, n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement) of the last axis of `values`:
    (n,) -> (n_resamples,), (m, n) -> (m, n_resamples), every row resampled alike."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    if n == 0:
        raise ValueError("no pairs to resample")
    rng = np.random.default_rng(seed)
    means = np.empty((*values.shape[:-1], n_resamples))
    for start in range(0, n_resamples, 1000):  # (1000, n) indices at a time
        idx = rng.integers(0, n, size=(min(1000, n_resamples - start), n))
        means[..., start : start + len(idx)] = values[..., idx].mean(-1)
    return means


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles of bootstrap samples (last axis)."""
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=-1)
    return float(low), float(high)


def accuracy_with_ci(
    margins: Sequence[float], n_resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(accuracy, low, high) of one method's margins."""
    correct = pair_correct(margins)
    return (
        float(correct.mean()),
        *percentile_interval(bootstrap_means(correct, n_resamples, seed), level),
    )


def accuracy_table(
    margins: dict[str, Sequence[float]],
    baseline: str | None = None,
    n_resamples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> list[dict]:
    """One row per method: `accuracy`, `ci_low`, `ci_high`, `pairs`; with a `baseline` method,
    also the difference accuracy - baseline's and its paired interval (`diff_*`)."""
    names = list(margins)
    correct = np.stack([pair_correct(margins[name]) for name in names])  # (m, n)
    samples = bootstrap_means(correct, n_resamples, seed)  # (m, B)
    rows = []
    for i, name in enumerate(names):
        low, high = percentile_interval(samples[i], level)
        row = {"method": name, "accuracy": float(correct[i].mean()), "ci_low": low,
               "ci_high": high, "pairs": correct.shape[1]}  # fmt: skip
        if baseline is not None and name != baseline:
            j = names.index(baseline)
            diff = samples[i] - samples[j]
            row["diff_vs"] = baseline
            row["diff"] = float(correct[i].mean() - correct[j].mean())
            row["diff_ci_low"], row["diff_ci_high"] = percentile_interval(diff, level)
        rows.append(row)
    return rows


def by_length(
    score: Callable[[list, list], torch.Tensor],
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    chunk: int = 64,
    desc: str = "scoring",
    progress: bool = True,
) -> list[float]:
    """`score(prompt ids, completion ids) -> (n,)` over all rows, `chunk` rows at a time in order
    of length (so a batch holds rows of similar length and little padding), given back in the
    rows' order."""
    from tqdm.auto import tqdm

    order = sorted(
        range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i])
    )
    out = [0.0] * len(order)
    for start in tqdm(range(0, len(order), chunk), desc=desc, unit="chunk", disable=not progress):
        rows = order[start : start + chunk]
        values = score([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows])
        for i, v in zip(rows, values.tolist(), strict=True):
            out[i] = v
    return out


def plot(accuracies: list[dict], margins: dict[str, Sequence[float]], out_dir: Path, title: str):
    """`accuracies.png` (bars with their intervals, chance at 0.5) and `margins.png` (one
    histogram of margins per method, each in its own units). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.0))
    x = np.arange(len(accuracies))
    acc = np.array([r["accuracy"] for r in accuracies])
    err = np.array([[r["accuracy"] - r["ci_low"] for r in accuracies],
                    [r["ci_high"] - r["accuracy"] for r in accuracies]])  # fmt: skip
    ax.bar(x, acc, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x, [r["method"] for r in accuracies], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"pairwise accuracy ({accuracies[0]['pairs']} held-out pairs)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracies.png", dpi=120)
    plt.close(fig)

    cols = 3
    rows = -(-len(margins) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, margins.items(), strict=False):
        ax.hist(values, bins=40, color="tab:orange", alpha=0.85)
        ax.axvline(0, color="black", linewidth=1)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(margins) :]:
        ax.axis("off")
    fig.suptitle("margins score(chosen) - score(rejected) on held-out pairs", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "margins.png", dpi=120)
    plt.close(fig)
