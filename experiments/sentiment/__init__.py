"""The DPO paper's controlled-sentiment experiment (Section 6.1) at CPU size: see docs/sentiment.md.

- `pairs`: prompts, the VADER reward and the pair builder (`python -m experiments.sentiment`);
- `evaluation`: held-out reward, KL and pair accuracy, and the `SentimentEval` callback;
- `frontier`: the best-of-N point of the reward-vs-KL frontier;
- `judge`: `VaderJudge`, VADER as the judge of online DPO (`lit_dpo.online`);
- `online`: online, semi-online and iterative DPO on the frontier
  (`python -m experiments.sentiment.online`).
"""

from experiments.sentiment.evaluation import (
    SentimentEval,
    datamodule_prompts,
    distinct_prompts,
    evaluate,
    heldout_prompts,
    pair_accuracy,
)
from experiments.sentiment.frontier import best_of_n_kl, expected_best_of_n
from experiments.sentiment.judge import VaderJudge
from experiments.sentiment.pairs import (
    ADJECTIVES,
    DETAILS,
    GENRES,
    NOUNS,
    TEMPLATES,
    build_pairs,
    make_pairs,
    make_prompts,
    score,
)

__all__ = [
    "ADJECTIVES",
    "DETAILS",
    "GENRES",
    "NOUNS",
    "TEMPLATES",
    "SentimentEval",
    "VaderJudge",
    "best_of_n_kl",
    "build_pairs",
    "datamodule_prompts",
    "distinct_prompts",
    "evaluate",
    "expected_best_of_n",
    "heldout_prompts",
    "make_pairs",
    "make_prompts",
    "pair_accuracy",
    "score",
]
