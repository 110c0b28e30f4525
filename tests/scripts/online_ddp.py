"""Online DPO with 2 CPU processes (DDP, gloo), no data module: each rank's rounds, metrics and
policy saved. Run by tests/test_online.py.

Usage: python online_ddp.py MODEL_DIR OUT_DIR
"""

import functools
import sys

import lightning as L
import torch

from lit_dpo.module import DPOModule
from lit_dpo.online import OnlineDPO


def judge(prompts, replies):
    """Longer replies score higher; among equals, more e's."""
    return [len(r) + r.count("e") / 100 for r in replies]


model_dir, out = sys.argv[1:3]
L.seed_everything(0)
module = DPOModule(
    model_dir, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), lr_scheduler=None
)
online = OnlineDPO(
    judge,
    prompts=[f"Review film number {i}." for i in range(12)],
    sync_every=2,
    n_samples=2,
    max_new_tokens=6,
    batch_size=2,
)
trainer = L.Trainer(
    accelerator="cpu",
    devices=2,
    strategy="ddp",
    max_steps=4,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    default_root_dir=out,
    callbacks=[online],
)
trainer.fit(module)
torch.save(
    {
        "policy": module.policy.state_dict(),
        "rounds": online.rounds,
        "metrics": {k: v.item() for k, v in trainer.callback_metrics.items()},
    },
    f"{out}/rank{trainer.global_rank}.pt",
)
