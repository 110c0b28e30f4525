"""The sentiment task's judge for online DPO (`lit_dpo.online.OnlineDPO`): VADER, the ground-truth
reward the pairs were labelled with, as a `lit_dpo.judges.Judge` a config can name:

    judge: {class_path: experiments.sentiment.VaderJudge}
"""

from __future__ import annotations

from collections.abc import Sequence

from experiments.sentiment.pairs import score
from lit_dpo.judges import Judge


class VaderJudge(Judge):
    """VADER's compound sentiment of each reply, in [-1, 1]; the prompt is not read (the
    prompts are sentiment-neutral: see `experiments.sentiment.pairs`)."""

    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        return score(replies)
