"""The HH experiment's report, rebuilt from its saved points alone (`python -m experiments.hh
report`): every method's margin per held-out pair, the accuracies with their bootstrap intervals,
the side-by-side samples, the summary and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.hh import evaluation
from experiments.hh.split import ROOT
from lit_dpo.utils import atomic_write, finite_json

RESULTS = ROOT / "experiments" / "results" / "hh"
LABELS = {
    "dpo_sigmoid": "DPO implicit reward",
    "preferred_ft": "Preferred-FT implicit reward",
    "reward_model": "explicit reward model",
    "reference_logp": "reference log-likelihood",
    "length": "length rule (longer wins)",
}


def margins_of(points: dict[str, dict]) -> dict[str, np.ndarray]:
    """Per held-out pair, each method's margin score(chosen) - score(rejected): the implicit
    rewards beta * log pi/pi_ref (per-token averages for a loss defined on them, e.g. IPO), the
    reward model's r, the reference's summed log-likelihood, and the reply length in characters."""
    from lit_dpo.losses import get_loss

    ref = points["reference"]
    test = ref["test"]
    rc, rr = (np.array(ref["logps"][k]) for k in ("chosen", "rejected"))
    nc, nr = np.array(test["chosen_tokens"]), np.array(test["rejected_tokens"])
    margins = {}
    for point, p in points.items():
        if point == "reference":
            continue
        if point == "reward_model":
            margins[point] = np.array(p["rewards"]["chosen"]) - np.array(p["rewards"]["rejected"])
            continue
        pc, pr = np.array(p["logps"]["chosen"]), np.array(p["logps"]["rejected"])
        sc, sr = pc - rc, pr - rr  # log pi/pi_ref, summed over the reply
        loss = p["config"]["loss_type"]
        if loss is not None and get_loss(loss).average:
            sc, sr = sc / nc, sr / nr
        beta = p["config"].get("beta", 1.0)  # Preferred-FT: log pi/pi_ref itself
        margins[point] = beta * (sc - sr)
    margins["reference_logp"] = rc - rr
    margins["length"] = np.array(test["chosen_chars"]) - np.array(test["rejected_chars"])
    order = [
        "dpo_sigmoid",
        *sorted(k for k in margins if k.startswith("dpo_") and k != "dpo_sigmoid"),
    ]
    order += ["preferred_ft", "reward_model", "reference_logp", "length"]
    return {k: margins[k] for k in order if k in margins}


def label(point: str) -> str:
    if point in LABELS:
        return LABELS[point]
    return f"DPO variant ({point.removeprefix('dpo_')}) implicit reward"


def report(
    out_dir: str = str(RESULTS), n_resamples: int = 10_000, seed: int = 0, quiet: bool = False
) -> dict:
    """Rebuild the report (tables, summary, plots) from the saved points.

    `accuracies.csv`: each method's pairwise accuracy on the held-out pairs, its 95%
    percentile-bootstrap interval, and its difference from the explicit reward model's with a
    paired interval; `margins.csv`: every pair's margins; `samples.csv`: the reference's and the
    DPO policy's replies side by side; `summary.json`; with matplotlib, `accuracies.png` and
    `margins.png`.

    Args:
        out_dir: the run's directory (holding `points/`).
        n_resamples: bootstrap resamples.
        seed: bootstrap seed.
        quiet: print nothing.
    """
    out = Path(out_dir)
    points = {p.stem: json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json"))}
    if "reference" not in points:
        raise FileNotFoundError(f"{out / 'points' / 'reference.json'}: run the experiment first")
    margins = margins_of(points)
    baseline = "reward_model" if "reward_model" in margins else None
    table = evaluation.accuracy_table(margins, baseline, n_resamples, seed)
    for row in table:
        row["label"] = label(row["method"])
    fields = ["method", "label", "accuracy", "ci_low", "ci_high", "pairs", "diff_vs", "diff",
              "diff_ci_low", "diff_ci_high"]  # fmt: skip
    _write_csv(out / "accuracies.csv", fields, table)
    test = points["reference"]["test"]
    lengths = {k: test[k] for k in ("chosen_tokens", "rejected_tokens", "chosen_chars",
                                    "rejected_chars")}  # fmt: skip
    per_pair = [
        {"test_row": test["rows"][i]}
        | {k: v[i] for k, v in lengths.items()}
        | {k: float(v[i]) for k, v in margins.items()}
        for i in range(test["pairs"])
    ]
    _write_csv(out / "margins.csv", list(per_pair[0]), per_pair)
    samples = []
    if "samples" in points["reference"]:
        ref = points["reference"]["samples"]
        dpo = points.get("dpo_sigmoid", {}).get("samples") or [{}] * len(ref)
        samples = [
            {"test_row": i, "prompt": r["prompt"], "reference": r["reply"], "dpo": d.get("reply")}
            for i, r, d in zip(test["rows"], ref, dpo, strict=False)  # the first n_prompts
        ]
        _write_csv(out / "samples.csv", ["test_row", "prompt", "reference", "dpo"], samples)
    summary = {
        "config": {k: p["config"] for k, p in points.items()},
        "pairs": {"test": test["pairs"], "test_stats": test["stats"]}
        | {k: p["train"]["pairs"] for k, p in points.items() if "train" in p},
        "accuracies": table,
        "train": {k: p["train"] for k, p in points.items() if "train" in p},
        "seconds": {k: p["seconds"] for k, p in points.items()},
        "samples": samples,
        "bootstrap": {"resamples": n_resamples, "seed": seed, "level": 0.95},
        "ties": "a pair whose margin is exactly 0 counts 1/2",
    }
    atomic_write(out / "summary.json", finite_json(summary, indent=1) + "\n")
    try:
        evaluation.plot(
            [r | {"method": r["label"]} for r in table],
            {label(k): v for k, v in margins.items()},
            out,
            f"Anthropic HH harmless-base, held-out pairs, 95% bootstrap intervals "
            f"({points['reference']['config']['model']})",
        )
    except ImportError:
        if not quiet:
            print("matplotlib is not installed: no plots (the CSV files are written)")
    if not quiet:
        print(f"pairwise accuracy on {test['pairs']} held-out pairs [95% bootstrap interval]")
        for r in table:
            line = f"  {r['label']:40s} {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
            if "diff" in r:
                line += (
                    f"  {r['diff']:+.3f} [{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}] vs RM"
                )
            print(line)
    return summary


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()})
    atomic_write(path, buffer.getvalue())
