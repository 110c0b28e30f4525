"""The main job's wall time (README command 1), config against config, side by side in one run.

Each config runs as `lit-dpo fit --config C` in a process of its own, one after another, into a
root of its own; a run's time is its process's wall time, start to exit, everything included
(imports, data, model loading, training, validation, the held-out evaluation). The held-out
numbers come from each run's `sentiment_eval.json`. Every config's time is printed as a ratio
of the first one's.

    .venv/bin/python -m benchmarks.main_job \\
        --configs benchmarks/configs/sentiment-smollm2-before.yaml,configs/sentiment-smollm2.yaml \\
        --out benchmarks/results/main-job.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("policy_reward", "reference_reward", "kl", "pair_accuracy", "seconds")


def run(config: str, root: Path, extra: list[str]) -> dict:
    """One fit of `config` into `root`: wall seconds, exit status, held-out evaluation. Each run
    tokenizes its data afresh (a datasets cache of its own), as a first run does."""
    cmd = [sys.executable, "-m", "lit_dpo.cli", "fit", "--config", config,
           "--trainer.default_root_dir", str(root), *extra]  # fmt: skip
    log = root / "log.txt"
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf")}
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    found = sorted(root.glob("**/sentiment_eval.json"))
    result = {"config": config, "wall_s": wall, "returncode": proc.returncode}
    result["eval"] = json.loads(found[-1].read_text()) if found else None
    result["last_validation"] = last_validation(root)
    if proc.returncode:
        result["log_tail"] = log.read_text()[-3000:]
    return result


def last_validation(root: Path) -> dict[str, float] | None:
    """The last validation's `val/...` numbers from the run's CSV metrics, if it logged any."""
    rows = [r for f in sorted(root.glob("**/metrics.csv")) for r in csv.DictReader(f.open())]
    rows = [r for r in rows if r.get("val/loss")]
    last = rows[-1] if rows else {}
    return {k: float(v) for k, v in last.items() if k.startswith("val/") and v} or None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", required=True, help="comma-separated; the first is the baseline")
    p.add_argument("--args", default="", help="more `lit-dpo fit` arguments, for every config")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--workdir", help="run roots go here (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="main-job-") as tmp:
        workdir = Path(args.workdir or tmp)
        results = []
        for i, config in enumerate(args.configs.split(",")):
            print(f"{config}: running ...", flush=True)
            results.append(run(config, workdir / f"run{i}", shlex.split(args.args)))
            r = results[-1]
            if r["returncode"]:
                print(f"{config}: FAILED (exit {r['returncode']}):\n{r['log_tail']}")
    base = results[0]["wall_s"]
    for r in results:
        r["wall_vs_first"] = r["wall_s"] / base
        numbers = ", ".join(f"{k} {r['eval'][k]:.3f}" for k in SHOWN if (r["eval"] or {}).get(k))
        if r["last_validation"]:
            numbers += f"; last validation {r['last_validation']}"
        print(f"{r['config']}: {r['wall_s'] / 60:.1f} min, x{r['wall_vs_first']:.2f}; {numbers}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": sys.argv, "results": results}, indent=2))
    return {"results": results}


if __name__ == "__main__":
    main()
