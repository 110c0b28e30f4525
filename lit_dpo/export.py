"""The trained policy in Hugging Face format: safetensors + config + tokenizer, loadable by
`AutoModelForCausalLM.from_pretrained(dir)`."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from lit_dpo.hub import resolve
from lit_dpo.module import DPOModule
from lit_dpo.utils import atomic_dir


def export_policy(module, out_dir: str | Path) -> Path:
    """Save `module.policy` and its tokenizer to `out_dir` (replaced whole, atomically).

    A LoRA policy is saved merged. A policy sharded with FSDP2 is gathered first: every rank
    must call this, and rank 0 writes."""
    from transformers import AutoTokenizer

    source = resolve(module.hparams.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=module.hparams.trust_remote_code
    )
    policy, state = module.policy, None
    if isinstance(policy, FSDPModule):  # sharded: gather the full weights, rank 0 writes
        state = get_model_state_dict(
            policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if torch.distributed.get_rank() != 0:
            return Path(out_dir)
    elif hasattr(policy, "merge_and_unload"):  # LoRA: the base with the adapters folded in
        policy = copy.deepcopy(policy).merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        policy.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def export_checkpoint(*, ckpt_path: str, output_dir: str) -> None:
    """Export the policy of a lit-dpo checkpoint to a Hugging Face directory.

    Args:
        ckpt_path: a `.ckpt` written by `lit-dpo fit` (e.g. `runs/<name>/checkpoints/last.ckpt`),
            or the directory of a sharded checkpoint (ModelParallelStrategy).
        output_dir: where to write `model.safetensors`, `config.json` and the tokenizer.
    """
    if Path(ckpt_path).is_dir():  # sharded (FSDP2, torch.distributed.checkpoint): consolidate
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(Path(ckpt_path))
        module = DPOModule(**checkpoint["hyper_parameters"])
        module.configure_model()
        module.load_state_dict(checkpoint["state_dict"])
    else:
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
        out = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf")
        if trainer.is_global_zero or isinstance(pl_module.policy, FSDPModule):
            export_policy(pl_module, out)  # sharded: every rank takes part in the gather
        if trainer.is_global_zero:
            print(f"policy exported to {out}")
        trainer.strategy.barrier()
