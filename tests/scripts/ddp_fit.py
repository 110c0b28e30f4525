"""Fit DPO with 2 CPU processes (DDP, gloo) and save each rank's policy: run by test_cli.py.

Usage: python ddp_fit.py MODEL_DIR DATA_FILE OUT_DIR
"""

import sys

import lightning as L
import torch

from lit_dpo.data import PreferenceDataModule
from lit_dpo.module import DPOModule

model_dir, data_file, out = sys.argv[1:4]
L.seed_everything(0)
module = DPOModule(model_dir, lr_scheduler=None)
data = PreferenceDataModule(data_file, tokenizer=model_dir, batch_size=2, val_fraction=0.25)
trainer = L.Trainer(
    accelerator="cpu",
    devices=2,
    strategy="ddp",
    max_steps=3,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    default_root_dir=out,
)
trainer.fit(module, data)
torch.save(
    {
        "policy": module.policy.state_dict(),
        "metrics": trainer.callback_metrics,
        "batches": trainer.num_training_batches,
    },
    f"{out}/rank{trainer.global_rank}.pt",
)
