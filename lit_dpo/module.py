"""DPOModule: a policy, its reference strategy, and the DPO loss family in one LightningModule."""

from __future__ import annotations

import functools
import math
import warnings
from typing import ClassVar, Literal

import torch
from jsonargparse.typing import PositiveFloat
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_dpo.hub import CausalLM, has_adapters
from lit_dpo.logps import IGNORE_INDEX, packing_unsupported, sequence_logps
from lit_dpo.losses import LOSSES, get_loss
from lit_dpo.policy import LinearWarmup, LoRA, PaperRMSprop, PolicyModule
from lit_dpo.reference import Reference, ReferenceSettings, make_reference
from lit_dpo.utils import STAGES, pairwise_accuracy

# Where OnlineDPO (lit_dpo/online.py) keeps its state in a checkpoint; a callback that reads it
# has `checkpoint_key` equal to this.
ONLINE_KEY = "lit_dpo_online"

# The optimizer, scheduler and LoRA settings are importable from here too (configs name them).
__all__ = ["DPOModule", "LinearWarmup", "LoRA", "PaperRMSprop"]

# The reference is frozen in eval mode on purpose: Lightning's notice about it is noise.
warnings.filterwarnings(
    "ignore",
    message=r"Found \d+ module\(s\) in eval mode",
    category=UserWarning,
    module=r"lightning\.",
)

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


class DPOModule(PolicyModule):
    model_args: ClassVar[tuple[str, ...]] = (*PolicyModule.model_args, "ref_model_name_or_path")
    assigning_policy: ClassVar[str] = "builds no reference"

    def __init__(
        self,
        *args,
        ref_model_name_or_path: str | CausalLM | None = None,
        ref_revision: str | None = None,
        reference: str | None = None,
        reference_sharding: Literal["shard", "replicate"] = "shard",
        reference_cache_dir: str | None = None,
        beta: PositiveFloat = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        **kwargs,
    ):
        """Direct Preference Optimization of a causal LM against a frozen reference.

        Takes every argument of `PolicyModule` (the policy's path or model object, optimizer,
        scheduler, LoRA, precision and memory settings) and:

        Args:
            ref_model_name_or_path: the reference (e.g. the SFT checkpoint): a hub id, a path,
                or from Python a model object (frozen in place, never copied). None: the
                policy's initial weights.
            ref_revision: the version of a hub reference to load (branch, tag or commit hash).
            reference: how the reference log-probs are obtained (`lit_dpo.reference.REFERENCES`).
                `copy`: a frozen copy of the policy's initial weights, made in memory (of a
                policy given as a `PeftModel`: of it, adapters included).
                `separate`: the model at `ref_model_name_or_path`, frozen.
                `precomputed`: one pass over the train, validation and test data before training
                computes them (with the model at `ref_model_name_or_path`, or the policy's
                initial weights), caches them on disk, and no reference model stays in memory.
                `adapter`: with `lora` or a `PeftModel` policy, the policy with its adapters
                disabled (no second copy; for a `PeftModel` it is the initial policy only if
                its adapters start at zero, as `get_peft_model` makes them).
                `none`: log pi_ref = 0, as `reference_free`.
                None: `separate` if `ref_model_name_or_path` is set, else `adapter` with `lora`,
                else `copy` (a `PeftModel` policy included: its adapters may not start at zero).
            reference_sharding: under ModelParallelStrategy (FSDP2), `shard` the reference like
                the policy, or `replicate` it whole on every device.
            reference_cache_dir: where precomputed reference log-probs are kept, keyed by the
                model, the tokenized data and the precision. None: `<LIT_DPO_CACHE>/reference`
                (`~/.cache/lit_dpo/reference`).
            beta: the KL-penalty strength (paper: 0.1; 0.5 for TL;DR). Must be positive and
                finite.
            loss_type: a loss name from `lit_dpo.losses.LOSSES` or a list of them to combine.
            loss_weights: one weight per loss in `loss_type` (default: all 1.0); e.g.
                `[sigmoid, nll]` with `[1.0, 0.2]` is RPO.
            label_smoothing: assumed label-noise rate eps in [0, 0.5), read by the losses
                registered with `smoothing=True` (sigmoid = cDPO, robust, exo_pair,
                sigmoid_norm); refused with a loss that would ignore it.
            reference_free: treat the reference log-probs as 0 (a uniform reference); no
                reference model is built.
        """
        if reference_free and reference is not None:
            raise ValueError(f"reference_free builds no reference: unset reference={reference!r}")
        super().__init__(*args, **kwargs)
        self.record_model_arg("ref_model_name_or_path", ref_model_name_or_path)
        hp, ref = self.hparams, self.model_source("ref_model_name_or_path")
        given = isinstance(ref, nn.Module) or bool(ref)
        if ref_revision and not (given and isinstance(ref, str)):
            raise ValueError(
                f"ref_revision={ref_revision!r} picks the version of a hub reference to load, "
                f"but ref_model_name_or_path is {hp.ref_model_name_or_path}: unset ref_revision"
            )
        loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        self.losses = [get_loss(name) for name in loss_types]  # raises on an unknown name
        self.loss_weights = list(loss_weights) if loss_weights else [1.0] * len(loss_types)
        if not loss_types or len(self.loss_weights) != len(loss_types):
            raise ValueError(
                f"loss_weights {loss_weights} must give one weight per loss_type {loss_types}"
            )
        if reference is None:
            name = "none" if reference_free else "separate" if given else None
            reference = name or ("adapter" if hp.lora else "copy")
        load_settings = {
            "torch_dtype": hp.torch_dtype,
            "attn_implementation": hp.attn_implementation,
        }
        revision = ref_revision if given else hp.revision  # of the model a reference cache uses
        if revision:  # only when set: the keys of caches made before stay valid
            load_settings["revision"] = revision
        self.reference_strategy: Reference = make_reference(
            ReferenceSettings(
                name=reference,
                path=ref if given else None,
                policy_path=self.model_source(),
                lora=hp.lora is not None or has_adapters(self.model_source()),
                cache_dir=reference_cache_dir,
                chunk_size=hp.logps_chunk_size,
                load_settings=load_settings,
            )
        )
        absolute = [name for name in loss_types if get_loss(name).needs_reference]
        if self.reference_strategy.uniform and absolute:
            raise ValueError(f"loss_type {absolute} needs a reference model; unset reference_free")
        if not beta > 0:  # also refuses NaN
            raise ValueError(f"beta must be positive, got {beta}")
        if not math.isfinite(beta):  # inf: every reward and loss inf or NaN
            raise ValueError(f"beta must be a finite positive number, got {beta}")
        if not all(math.isfinite(w) for w in self.loss_weights):
            raise ValueError(f"loss_weights must be finite, got {self.loss_weights}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.loss_types = loss_types
        if label_smoothing > 0:
            _refuse_ignored_smoothing(label_smoothing, loss_types)
        self._pairs_checked = False  # the first training batch is checked for real pairs
        self.reference: nn.Module | None = None  # the strategy's network, when it holds one
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
        policy = self.load_policy()
        load = functools.partial(self.load_model, revision=self.hparams.ref_revision)
        # From the initial weights, before adapters or sharding wrap the policy.
        self.reference = self.reference_strategy.build(policy, load, self._place)
        self.policy = self.wrap_policy(policy)
        if self._trainer is not None:  # not needed to load or export
            self.reference_strategy.prepare(self.policy, self.trainer, load)

    @property
    def reference_mode(self) -> str:
        """The name of the reference strategy in use (`copy`, `separate`, ..., `none`)."""
        return self.reference_strategy.settings.name

    def _place(self, reference: nn.Module) -> nn.Module:
        """Where a reference network lives: sharded like the policy, or whole on this device."""
        if self.hparams.reference_sharding == "shard":
            return self.shard(reference)
        return reference.to(self.trainer.strategy.root_device) if self._trainer else reference

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
        ref = self.reference_strategy.logps(self.policy, batch, stage)
        policy = sequence_logps(self.policy, batch, self.hparams.logps_chunk_size)
        n = len(policy.sum) // 2
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
            "rewards/accuracies": pairwise_accuracy(margins),
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

    # -- refusing data that is not preference pairs ------------------------------------------

    @property
    def packing_refusal(self) -> str | None:
        """Why this module would read packed batches wrongly; None when it reads them right
        (PreferenceDataModule's packing="auto" then packs a batch whenever that saves rows)."""
        return packing_unsupported(self.policy) if self.policy is not None else "no policy yet"

    def setup(self, stage: str) -> None:
        """Unpaired rows (prompt/completion: SFT or KTO-style data) give chosen = rejected in every
        pair: the loss would stay ln 2 and nothing would train. Refused before any step by a
        datamodule that knows its splits' formats (`PreferenceDataModule.require_pairs`); the
        first training batch is checked too (`training_step`), for any other source."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        require_pairs = getattr(datamodule, "require_pairs", None)
        if callable(require_pairs):
            require_pairs()

    def on_train_start(self) -> None:
        self._pairs_checked = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if not self._pairs_checked:  # once per fit: dataloaders given to `fit` directly too
            self._pairs_checked = True
            same = identical_pairs(batch)
            if self.trainer.strategy.reduce_boolean_decision(same, all=True):
                raise ValueError(
                    "every pair of the first training batch has identical chosen and rejected "
                    "completions: DPO needs preference pairs (prompt/chosen/rejected) that "
                    "differ; for unpaired prompt/completion rows (KTO-style or SFT data) "
                    "train SFTModule instead"
                )
        return super().training_step(batch, batch_idx)

    # -- checkpoints: what they were made from; the reference is rebuilt, not stored ---------

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        fit = self._trainer is not None and self.trainer.state.fn == "fit"
        keys = [getattr(c, "checkpoint_key", None) for c in self.trainer.callbacks] if fit else []
        if ONLINE_KEY in checkpoint and fit and ONLINE_KEY not in keys:
            raise ValueError(
                "the checkpoint was trained online (an OnlineDPO callback made its pairs): resume "
                "it with the same OnlineDPO callback, or start a new run"
            )

    def objective(self) -> dict:
        hp, settings = self.hparams, self.reference_strategy.settings
        return super().objective() | {
            "beta": hp.beta,
            "loss_type": self.loss_types,
            "loss_weights": self.loss_weights,
            "label_smoothing": hp.label_smoothing,
            "reference": settings.name,
            "reference weights": (
                self.fingerprint(settings.path, hp.ref_revision)
                if settings.path is not None
                else None
            ),
            "reference revision": hp.ref_revision,
        }

    def run_record(self) -> dict:
        record = super().run_record()
        record["sources"]["reference"] = self.hparams.ref_model_name_or_path
        return record

    def _rebuilt_keys(self) -> set[str]:
        if self.sharded:
            return set()
        reference = self.reference.state_dict() if self.reference is not None else {}
        return super()._rebuilt_keys() | {f"reference.{k}" for k in reference}


def identical_pairs(batch: dict[str, Tensor]) -> bool:
    """Whether every pair of a collated batch has the same chosen and rejected completion tokens
    (labels), padded (rows i and B+i) or packed (sequences i and B+i, by `row_ids`)."""
    labels = batch["labels"]
    if "row_ids" not in batch:
        n = len(labels) // 2
        return bool((labels[:n] == labels[n:]).all())
    n = int(batch["n_rows"]) // 2
    tokens = [labels[(batch["row_ids"] == i) & (labels != IGNORE_INDEX)] for i in range(2 * n)]
    return all(torch.equal(tokens[i], tokens[n + i]) for i in range(n))


def _refuse_ignored_smoothing(label_smoothing: float, loss_types: list[str]) -> None:
    """label_smoothing > 0 with a loss that ignores it (or with no loss that reads it) would
    silently train without it."""
    ignoring = [n for n in loss_types if LOSSES[n].smoothing is False]
    if ignoring or not any(LOSSES[n].smoothing for n in loss_types):
        readers = ", ".join(name for name, loss in LOSSES.items() if loss.smoothing)
        ignored = ", ".join(ignoring or loss_types)
        raise ValueError(
            f"label_smoothing={label_smoothing} is ignored by loss_type {ignored}: only "
            f"{readers} read it; set label_smoothing to 0, or use one of those"
        )


def _key(metric_name: str) -> str:
    """Module names may not contain '/' or '.'."""
    return metric_name.replace("/", "_")
