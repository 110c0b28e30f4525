"""Fit DPO with 2 CPU processes under ModelParallelStrategy (FSDP2, gloo): run by
test_scale.py. Saves a sharded checkpoint every step, exports the policy to one HF directory,
and writes each rank's per-step losses.

Usage: python fsdp2_fit.py MODEL_DIR DATA_FILE OUT_DIR MAX_STEPS [RESUME_CKPT] [--replicate]
       [--precomputed] [--bf16-true]
"""

import json
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_dpo.data import PreferenceDataModule
from lit_dpo.export import HFExport
from lit_dpo.module import DPOModule

args = [a for a in sys.argv[1:] if not a.startswith("--")]
model_dir, data_file, out, max_steps = args[:4]
resume = args[4] if len(args) > 4 else None


class Losses(Callback):
    def __init__(self):
        self.losses, self.grad_norms = {}, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # the step's loss over both ranks' pairs and its logged gradient norm, keyed by the step
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses[trainer.global_step - 1] = loss.item()
        norm = trainer.callback_metrics["train/grad_norm"].item()
        self.grad_norms[trainer.global_step - 1] = norm


L.seed_everything(0)
module = DPOModule(
    model_dir,
    optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    lr_scheduler=None,
    reference_sharding="replicate" if "--replicate" in sys.argv else "shard",
    reference="precomputed" if "--precomputed" in sys.argv else None,
    reference_cache_dir=f"{out}/cache",
)
data = PreferenceDataModule(data_file, tokenizer=model_dir, batch_size=2, val_fraction=0.25)
losses = Losses()
trainer = L.Trainer(
    accelerator="cpu",
    devices=2,
    strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    max_steps=int(max_steps),
    logger=False,
    enable_progress_bar=False,
    precision="bf16-true" if "--bf16-true" in sys.argv else "32-true",
    enable_model_summary=False,
    limit_val_batches=0,
    num_sanity_val_steps=0,
    default_root_dir=out,
    callbacks=[
        losses,
        ModelCheckpoint(dirpath=f"{out}/checkpoints", every_n_train_steps=1, save_top_k=-1),
        HFExport(f"{out}/hf"),
    ],
)
trainer.fit(module, data, ckpt_path=resume)
with open(f"{out}/losses-rank{trainer.global_rank}.json", "w") as f:
    json.dump({"losses": losses.losses, "grad_norms": losses.grad_norms}, f)
