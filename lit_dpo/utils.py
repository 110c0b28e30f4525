"""Small helpers and constants shared across lit_dpo: one home each.

The ground floor: imports nothing from lit_dpo, so any module may import it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

STAGES = ("train", "val", "test")  # Lightning's stages, the prefixes of logged metric names
STAGE_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # stage -> data split


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token, else EOS: padding is masked out of attention and labels, so
    any id serves (GPT-2 and Llama tokenizers ship without a pad token)."""
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def pairwise_accuracy(margins: Tensor) -> Tensor:
    """Per pair, 1 where the chosen reward is higher, 0 where lower, and 0.5 for a tie (margin
    exactly 0, as for every pair at step 0): the accuracy of a coin flip, not 0 (which reads as
    "always wrong")."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put `models` in eval mode under no_grad, then restore each one's previous mode."""
    models = [m for m in models if m is not None]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def finite_json(value, **kwargs) -> str:
    """`json.dumps` that always writes JSON: a non-finite float (NaN, inf), at any depth, is
    written `null`. Python's own `json` writes `NaN` and `Infinity`, which are not JSON (RFC
    8259): JavaScript's JSON.parse and most parsers outside Python refuse the whole file."""

    def finite(v):
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), allow_nan=False, **kwargs)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes `path` only if the block succeeds: written as a hidden
    temporary sibling (same directory, so same filesystem), synced, then renamed over `path`.
    A killed run or a full disk never leaves a half file under the final name, and the
    temporary is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden, and not a *.ckpt
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a crash
    try:
        os.fsync(directory)
    except OSError:  # some filesystems refuse to sync a directory: the file itself is synced
        pass
    finally:
        os.close(directory)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """`data` (text as UTF-8) written to `path` through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`, renamed to `out` only if the block succeeds, so a
    killed write never leaves a directory that looks complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
