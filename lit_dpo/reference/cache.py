"""Precomputed reference log-probs: computed once over every split, cached on disk, looked up by
each pair's row index during training, so no reference model stays in memory.

The cache file is named by a key that hashes everything the numbers depend on: the reference
model's files, its dtype and attention, the trainer's precision and each tokenized split's
`datasets` fingerprint (which covers the source data and the tokenization settings). A file
whose stored key, splits or shapes disagree, or that cannot be read, is rebuilt, never used.

Everything here takes explicit inputs (a model, datasets, a collate function, a Lightning
strategy): nothing reads a LightningModule.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file, save
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_dpo.hub import module_fingerprint, resolve
from lit_dpo.logps import SequenceLogps, sequence_logps
from lit_dpo.utils import atomic_write, eval_mode

Table = dict[str, Tensor]  # {split: (rows, 2 [sum, mean], 2 [chosen, rejected]) float32}


def lookup(table: Table, index: Tensor, split: str) -> SequenceLogps:
    """The reference's `SequenceLogps` of a batch's pairs (chosen rows, then rejected rows)."""
    rows = table[split][index.cpu()].to(index.device)  # (B, 2 [sum, mean], 2 [chosen, rejected])
    total, mean = (torch.cat([rows[:, k, 0], rows[:, k, 1]]) for k in (0, 1))
    return SequenceLogps(sum=total, mean=mean, logits_mean=torch.zeros_like(total))


def load_or_compute(
    model: Callable[[], nn.Module],
    datasets: dict[str, Dataset],
    collate: Callable,
    strategy: Strategy,
    path: Path,
    key: str,
    batch_size: int,
    chunk_size: int | None = None,
) -> Table:
    """The table for `datasets` ({split: tokenized pairs carrying `index`}) from the cache file
    `path` when it holds `key`, else computed now with `model()` (called only then) and written.
    Under DDP/FSDP2 each rank scores its shard and the results are gathered."""
    table, problem = read(path, key, {s: len(d) for s, d in datasets.items()})
    if table is not None:
        rank_zero_info(f"reference log-probs: read from {path}")
        return table
    if problem != "missing":
        rank_zero_warn(f"reference cache {path} is {problem}: computing it again")
    table = compute(model(), datasets, collate, strategy, batch_size, chunk_size)
    if strategy.is_global_zero:
        write(path, key, table)
        rank_zero_info(f"reference log-probs: written to {path}")
    strategy.barrier()
    return table


def cache_key(source: str | nn.Module, settings: dict, datasets: dict) -> str:
    """Hash of the reference model's files (`source`; a model object: its weights), the
    `settings` its numbers depend on (dtype, attention, revision, precision) and each split's
    `datasets` fingerprint."""
    parts = {
        "model": model_fingerprint(source),
        **settings,
        "data": {split: d._fingerprint for split, d in datasets.items()},
        "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def model_fingerprint(name_or_path: str | nn.Module) -> str | list:
    """A local model by its files' names, sizes and modification times (cheap at any size); a
    Hub id by its name (its revision is among the settings); a model object by its weights in
    memory (`module_fingerprint`)."""
    if isinstance(name_or_path, nn.Module):
        return module_fingerprint(name_or_path)
    path = Path(resolve(name_or_path))
    if not path.exists():
        return name_or_path
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def read(path: Path, key: str, lengths: dict[str, int]) -> tuple[Table | None, str]:
    """(table, "") if `path` holds the key and every split's rows, finite; else (None, why)."""
    if not path.exists():
        return None, "missing"
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stored = f.metadata().get("key")
        table = load_file(str(path))
    except Exception as err:  # a truncated or foreign file: any failure means rebuild
        return None, f"unreadable ({type(err).__name__}: {err})"
    if stored != key:
        return None, "stale (its key differs)"
    for split, n in lengths.items():
        t = table.get(split)
        if t is None or t.shape != (n, 2, 2) or not torch.isfinite(t).all():
            return None, f"damaged (split {split!r} is missing, misshapen or not finite)"
    return table, ""


def write(path: Path, key: str, table: Table) -> None:
    """Atomically (`atomic_write`): a killed run leaves no half file under the cache's name."""
    tensors = {k: v.contiguous() for k, v in table.items()}
    atomic_write(path, save(tensors, metadata={"key": key}))


def compute(
    model: nn.Module,
    datasets: dict[str, Dataset],
    collate: Callable,
    strategy: Strategy,
    batch_size: int,
    chunk_size: int | None = None,
) -> Table:
    """Score every split once with `model` (in eval mode, then given back in its mode): each
    rank its DistributedSampler shard, gathered to all ranks."""
    device = strategy.root_device
    model.to(device)
    shard = getattr(strategy, "distributed_sampler_kwargs", None) or {"num_replicas": 1, "rank": 0}
    table = {}
    with eval_mode(model):
        for split, data in datasets.items():
            loader = DataLoader(
                data,
                batch_size=batch_size,
                sampler=DistributedSampler(data, shuffle=False, **shard),
                collate_fn=collate,
            )
            indices, values = [], []
            for i, batch in enumerate(loader):
                if strategy.is_global_zero and i % 50 == 0:
                    rank_zero_info(f"reference log-probs: {split} batch {i + 1}/{len(loader)}")
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                with strategy.precision_plugin.forward_context():
                    lp = sequence_logps(model, batch, chunk_size)
                n = len(batch["index"])
                pairs = torch.stack([lp.sum, lp.mean], 1).float()  # (2B, 2 [sum, mean])
                values.append(torch.stack([pairs[:n], pairs[n:]], 2))  # (B, 2, 2)
                indices.append(batch["index"])
            index = strategy.all_gather(torch.cat(indices)).reshape(-1).cpu()
            value = strategy.all_gather(torch.cat(values)).reshape(-1, 2, 2).cpu()
            table[split] = torch.full((len(data), 2, 2), float("nan"))
            table[split][index] = value  # DistributedSampler's padding repeats rows: same values
    return table
