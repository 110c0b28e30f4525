"""Fit DPO on CPU with a checkpoint every step, optionally killing or interrupting itself:
run by test_faults.py.

Usage: python resume_fit.py MODEL_DIR DATA_FILE OUT_DIR MAX_STEPS
           [--kill-at N | --interrupt-at N] [--resume CKPT]
"""

import argparse
import os
import signal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_dpo.callbacks import InterruptCheckpoint
from lit_dpo.data import PreferenceDataModule
from lit_dpo.module import DPOModule


class SignalAt(Callback):
    """Send `sig` to this process when step `n` starts (the checkpoint of step n is on disk)."""

    def __init__(self, n: int, sig: int):
        self.n, self.sig = n, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.n:
            os.kill(os.getpid(), self.sig)


p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("data_file")
p.add_argument("out")
p.add_argument("max_steps", type=int)
p.add_argument("--kill-at", type=int)
p.add_argument("--interrupt-at", type=int)
p.add_argument("--resume")
args = p.parse_args()
# As in a terminal: a process started in the background by a non-interactive shell inherits
# SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)

L.seed_everything(0)
module = DPOModule(
    args.model_dir,
    optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    lr_scheduler=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=10),
)
data = PreferenceDataModule(args.data_file, tokenizer=args.model_dir, batch_size=2, val_split=None)
callbacks = [
    ModelCheckpoint(dirpath=f"{args.out}/ckpt", every_n_train_steps=1, save_last=True),
    InterruptCheckpoint(),
]
if args.kill_at is not None:
    callbacks.append(SignalAt(args.kill_at, signal.SIGKILL))
if args.interrupt_at is not None:
    callbacks.append(SignalAt(args.interrupt_at, signal.SIGINT))  # what Ctrl-C sends
trainer = L.Trainer(
    accelerator="cpu",
    max_steps=args.max_steps,
    max_epochs=-1,
    deterministic=True,
    logger=False,
    callbacks=callbacks,
    enable_progress_bar=False,
    enable_model_summary=False,
    default_root_dir=args.out,
)
trainer.fit(module, data, ckpt_path=args.resume)
torch.save(module.policy.state_dict(), f"{args.out}/final.pt")
