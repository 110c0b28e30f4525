"""Callbacks the `lit-dpo` command always adds."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class InterruptCheckpoint(Callback):
    """On Ctrl-C during `fit`, save a checkpoint before Lightning shuts down, so that
    `--ckpt_path <it>` resumes where the run stopped instead of at the last periodic checkpoint.

    Args:
        filename: written beside the run's other checkpoints (the ModelCheckpoint's directory,
            else `<log_dir>/checkpoints`).
    """

    def __init__(self, filename: str = "interrupted.ckpt"):
        self.filename = filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        ckpt = trainer.checkpoint_callback
        root = trainer.log_dir or trainer.default_root_dir
        dirpath = ckpt.dirpath if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath else None
        path = os.path.join(dirpath or os.path.join(root, "checkpoints"), self.filename)
        trainer.save_checkpoint(path)  # Lightning writes it atomically (temp file, then move)
        rank_zero_info(f"Interrupted at step {trainer.global_step}: saved {path}")
