"""Fit DPO with 2 CPU processes (DDP, gloo) and save each rank's policy: run by test_cli.py.

Usage: python ddp_fit.py MODEL_DIR DATA_FILE OUT_DIR [REFERENCE]
REFERENCE: e.g. `precomputed` (cached under OUT_DIR/cache); the reference passes are counted.
"""

import sys

import lightning as L
import torch

import lit_dpo.reference.cache
from lit_dpo.data import PreferenceDataModule
from lit_dpo.module import DPOModule

model_dir, data_file, out = sys.argv[1:4]
reference = sys.argv[4] if len(sys.argv) > 4 else None
reference_batches = 0
score = lit_dpo.reference.cache.sequence_logps


def counted(*args, **kwargs):
    global reference_batches
    reference_batches += 1
    return score(*args, **kwargs)


lit_dpo.reference.cache.sequence_logps = counted
L.seed_everything(0)
module = DPOModule(
    model_dir, lr_scheduler=None, reference=reference, reference_cache_dir=f"{out}/cache"
)
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
        "reference_batches": reference_batches,
    },
    f"{out}/rank{trainer.global_rank}.pt",
)
