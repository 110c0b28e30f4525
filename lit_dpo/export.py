"""The trained policy in Hugging Face format: safetensors + config + tokenizer, loadable by
`AutoModelForCausalLM.from_pretrained(dir)`."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_dpo.hub import atomic_dir, resolve


def export_policy(module, out_dir: str | Path) -> Path:
    """Save `module.policy` and its tokenizer to `out_dir` (replaced whole, atomically)."""
    from transformers import AutoTokenizer

    source = resolve(module.hparams.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=module.hparams.trust_remote_code
    )
    with atomic_dir(out_dir) as tmp:
        module.policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def export_checkpoint(*, ckpt_path: str, output_dir: str) -> None:
    """Export the policy of a lit-dpo checkpoint to a Hugging Face directory.

    Args:
        ckpt_path: a `.ckpt` written by `lit-dpo fit` (e.g. `runs/<name>/checkpoints/last.ckpt`).
        output_dir: where to write `model.safetensors`, `config.json` and the tokenizer.
    """
    from lit_dpo.module import DPOModule

    module = DPOModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    print(f"exported {ckpt_path} -> {export_policy(module, output_dir)}")


class HFExport(Callback):
    """Write the policy in Hugging Face format when `fit` ends.

    Args:
        dirpath: target directory, replaced whole when fit ends: do not point it at a
            directory that holds anything else (logs, checkpoints). None: `<log_dir>/hf` (the
            run's log directory, or `default_root_dir` without a logger).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            out = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf")
            print(f"policy exported to {export_policy(pl_module, out)}")
        trainer.strategy.barrier()
