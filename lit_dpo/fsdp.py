"""FSDP wrapping that a YAML config can name: decoder-layer classes given as dotted paths."""

from __future__ import annotations

import importlib

from torch.distributed.fsdp.wrap import ModuleWrapPolicy


class WrapLayers(ModuleWrapPolicy):
    """Wrap (or activation-checkpoint) every module of the given classes, e.g.
    `[transformers.models.llama.modeling_llama.LlamaDecoderLayer]`.

    Lightning's FSDPStrategy takes a set of classes, which YAML cannot spell; this is the same
    policy built from class paths.

    Args:
        layers: dotted paths of the module classes to wrap.
    """

    def __init__(self, layers: list[str]):
        super().__init__({_import(path) for path in layers})


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
