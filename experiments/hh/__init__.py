"""The DPO paper's title claim on real data (Section 6, Anthropic HH) at CPU size: the implicit
reward of a DPO policy against an explicit Bradley-Terry reward model. See docs/hh.md.

- `split`: a fixed train / validation / test split of HH harmless-base by a hash of each row;
- `evaluation`: pairwise accuracy with a percentile-bootstrap interval, per-pair scoring, plots;
- `run`: the resumable experiment (each point trained once, saved as JSON);
- `results`: the report, rebuilt from the saved points (tables, summary, plots).

    python -m experiments.hh split     # data/hh-rlhf/harmless-base/split/*.jsonl.gz
    python -m experiments.hh run       # experiments/results/hh/
    python -m experiments.hh report    # only rebuild the tables and plots from the points

(`split` and `run` share their names with their modules' main functions, so those functions are
not re-exported here: `experiments.hh.split.split`, `experiments.hh.run.run`.)
"""

from experiments.hh.evaluation import (
    accuracy_table,
    accuracy_with_ci,
    bootstrap_means,
    pair_correct,
    percentile_interval,
)
from experiments.hh.split import assign, read_rows, split_key, split_lines

__all__ = [
    "accuracy_table",
    "accuracy_with_ci",
    "assign",
    "bootstrap_means",
    "pair_correct",
    "percentile_interval",
    "read_rows",
    "split_key",
    "split_lines",
]
