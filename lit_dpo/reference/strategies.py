"""Reference strategies: how a DPO run obtains log pi_ref(y|x), one small class each.

Every strategy takes the same `ReferenceSettings` (refusing those it cannot honour, in one line),
and DPOModule calls the same three methods on whichever it holds:

- `build(policy, load, place)` in `configure_model`, with the freshly loaded policy (before LoRA
  or sharding wrap it): returns the reference network it keeps in memory, if any;
- `prepare(policy, trainer, load)` at the end of `configure_model`, once a Trainer is attached;
- `logps(policy, batch, stage)`: the reference's `SequenceLogps` of a collated batch.

Adding a strategy = a subclass decorated with `@register("name")` (then `reference: name`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from lit_dpo.hub import cache_dir, describe
from lit_dpo.logps import SequenceLogps, sequence_logps
from lit_dpo.reference import cache
from lit_dpo.utils import STAGE_SPLITS

# A reference source (name, path or model object) -> the model: loaded like the policy, an
# object as it is.
Loader = Callable[[str | nn.Module], nn.Module]


@dataclass(frozen=True)
class ReferenceSettings:
    """What DPOModule tells every strategy.

    Args:
        name: the strategy's registry name, for messages.
        path: `ref_model_name_or_path`: a separate reference model (a name, a path or a model
            object), or None.
        policy_path: the policy's `model_name_or_path` (a name, a path or a model object).
        lora: whether the policy has adapters (`lora`, or a `PeftModel` given).
        cache_dir: where precomputed log-probs are kept (None: `<LIT_DPO_CACHE>/reference`).
        chunk_size: `logps_chunk_size`.
        load_settings: the load settings the numbers depend on (dtype, attention; revision
            when set).
    """

    name: str
    path: str | nn.Module | None = None
    policy_path: str | nn.Module = ""
    lora: bool = False
    cache_dir: str | None = None
    chunk_size: int | None = None
    load_settings: dict = field(default_factory=dict)


class Reference:
    """A way of obtaining the reference log-probs. `model` is the network it holds, if any
    (DPOModule registers it as `reference`: frozen, in eval mode, left out of checkpoints)."""

    uniform: ClassVar[bool] = False  # log pi_ref = 0: no reference at all (reference-free)
    takes_path: ClassVar[bool | None] = False  # True: needs `path`; None: either way

    def __init__(self, settings: ReferenceSettings):
        self.settings = settings
        self.model: nn.Module | None = None
        if self.takes_path is not None and self.takes_path != (settings.path is not None):
            raise ValueError(
                f"reference={settings.name!r} and ref_model_name_or_path={name(settings.path)}: "
                "a separate reference needs the path; copy and adapter take none"
            )

    def build(self, policy: nn.Module, load: Loader, place: Callable) -> nn.Module | None:
        return None

    def prepare(self, policy: nn.Module, trainer: L.Trainer, load: Loader) -> None:
        pass

    def logps(self, policy: nn.Module, batch: dict[str, Tensor], stage: str) -> SequenceLogps:
        raise NotImplementedError


REFERENCES: dict[str, type[Reference]] = {}


def register(name: str) -> Callable[[type[Reference]], type[Reference]]:
    """Class decorator: make a strategy available as `reference: <name>`."""

    def add(cls: type[Reference]) -> type[Reference]:
        REFERENCES[name] = cls
        return cls

    return add


def make_reference(settings: ReferenceSettings) -> Reference:
    if settings.name not in REFERENCES:
        raise ValueError(
            f"unknown reference strategy {settings.name!r}; known: {', '.join(REFERENCES)}"
        )
    return REFERENCES[settings.name](settings)


def freeze(model: nn.Module) -> nn.Module:
    return model.requires_grad_(False).eval()


def name(source: str | nn.Module | None) -> str:
    """A reference source as messages name it: a path quoted, a model object described."""
    return describe(source) if isinstance(source, nn.Module) else repr(source)


@register("none")
class NoReference(Reference):
    """Reference-free: log pi_ref = 0 (a uniform reference); nothing is built."""

    uniform = True

    def __init__(self, settings: ReferenceSettings):
        if settings.path is not None:
            raise ValueError("reference_free builds no reference: unset ref_model_name_or_path")
        super().__init__(settings)

    def logps(self, policy, batch, stage):
        n = int(batch["n_rows"]) if "n_rows" in batch else len(batch["input_ids"])
        zeros = torch.zeros(n, device=batch["input_ids"].device)
        return SequenceLogps(zeros, zeros, zeros)


@register("copy")
class CopyReference(Reference):
    """A frozen copy of the policy's initial weights, made in memory (the one copy made: a policy
    given as an object trains in place)."""

    def build(self, policy, load, place):
        self.model = place(freeze(copy.deepcopy(policy)))
        return self.model

    @torch.no_grad()
    def logps(self, policy, batch, stage):
        return sequence_logps(self.model, batch, self.settings.chunk_size)


@register("separate")
class SeparateReference(CopyReference):
    """The model at `ref_model_name_or_path` (e.g. the SFT checkpoint), frozen; a model object
    given there is frozen in place, not copied."""

    takes_path = True

    def build(self, policy, load, place):
        self.model = place(freeze(load(self.settings.path)))
        return self.model


@register("adapter")
class AdapterReference(Reference):
    """With LoRA: the policy itself with its adapters disabled (no second copy)."""

    def __init__(self, settings: ReferenceSettings):
        if not settings.lora:
            raise ValueError("reference='adapter' needs lora (or a PeftModel policy): the "
                             "reference is the policy with its adapters disabled")  # fmt: skip
        super().__init__(settings)

    @torch.no_grad()
    def logps(self, policy, batch, stage):
        with policy.disable_adapter():
            return sequence_logps(policy, batch, self.settings.chunk_size)


@register("precomputed")
class PrecomputedReference(Reference):
    """One pass over the train, validation and test data before training computes the log-probs
    (with the model at `ref_model_name_or_path`, or the policy's initial weights), caches them on
    disk, and no reference model stays in memory."""

    takes_path = None

    def __init__(self, settings: ReferenceSettings):
        super().__init__(settings)
        self.table: cache.Table | None = None

    def prepare(self, policy, trainer, load):
        """Runs in configure_model, before a checkpoint's weights are restored: the policy
        still holds its initial weights."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "collate"):
            raise ValueError("reference='precomputed' needs a Trainer with a PreferenceDataModule")
        splits = {"train": dm.train_dataset, "validation": dm.val_dataset, "test": dm.test_dataset}
        datasets = {s: d for s, d in splits.items() if d is not None}
        s = self.settings
        settings = s.load_settings | {"precision": str(trainer.precision)}
        source = s.path if s.path is not None else s.policy_path
        key = cache.cache_key(source, settings, datasets)
        root = Path(s.cache_dir) if s.cache_dir else cache_dir() / "reference"
        self.table = cache.load_or_compute(
            lambda: load(s.path) if s.path is not None else policy,  # a separate model: this pass
            datasets,
            dm.collate,
            trainer.strategy,
            root / f"{key}.safetensors",
            key,
            batch_size=dm.eval_batch_size,
            chunk_size=s.chunk_size,
        )

    def logps(self, policy, batch, stage):
        if self.table is None:
            raise ValueError(
                "reference='precomputed' needs a Trainer with a PreferenceDataModule: its "
                "log-probs are computed when the Trainer sets the module up"
            )
        return cache.lookup(self.table, batch["index"], STAGE_SPLITS[stage])
