"""The trained policy in Hugging Face format: safetensors + config + tokenizer, loadable by
`AutoModelForCausalLM.from_pretrained(dir)`.

Two rules. An export never deletes a file lit_dpo did not write: it goes to a new or empty
directory, or replaces a previous export, which a marker file lists file by file; anything else
is refused before any work. And no pickle from a checkpoint runs code: a `.ckpt` file is loaded
with `weights_only`, a sharded checkpoint's `.metadata` by an unpickler that knows only the
torch.distributed.checkpoint metadata classes, unless the user passes `trust_checkpoint`.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from lit_dpo.hub import resolve
from lit_dpo.module import DPOModule
from lit_dpo.utils import atomic_write

MARKER = ".lit_dpo_export.json"  # in every export: what it came from and the files it holds
_TMP = ".lit_dpo_export.tmp-"  # the export being written (a killed one's leftovers are ours too)
_TRUST = "pass --trust_checkpoint true only if you trust whoever wrote it"


# -- where an export may go -------------------------------------------------------------------


def _entries(directory: Path) -> set[str]:
    """Every file and folder under `directory`, as relative POSIX paths."""
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")}


def _listed(directory: Path) -> set[str]:
    """The paths a previous export's marker lists (none without a readable marker)."""
    try:
        return set(json.loads((directory / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _ours(rel: str, listed: set[str]) -> bool:
    top = rel.split("/")[0]
    return rel in listed or top == MARKER or top.startswith((_TMP, f".{MARKER}."))


def check_target(out: str | Path, option: str = "output directory") -> None:
    """Refuse (ValueError, one line) an export target that holds anything lit_dpo did not write.

    Allowed: a path that does not exist, an empty directory, or a previous export (its marker
    lists every file in it). `option` names the setting in the message (`--output_dir`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory: pick a new or empty {option}")
    if not out.exists():
        return
    listed = _listed(out)
    foreign = sorted(rel for rel in _entries(out) if not _ours(rel, listed))
    if foreign:
        named = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if foreign[3:] else "")
        raise ValueError(
            f"{out} holds files lit_dpo did not write ({named}): pick a new or empty {option}"
        )


def _write_export(out: Path, write: Callable[[Path], None], about: dict) -> None:
    """`write(tmp)` the export into a temporary directory, then put it at `out`.

    A new `out` appears whole, in one rename. An existing one (empty, or a previous export) is
    kept, with its owner and mode (it may be a mount point or the shell's working directory),
    and only the files its marker lists are replaced; throughout, the marker lists every file
    present, so a killed export leaves a directory the next export may replace."""
    check_target(out)  # again at write time: something may have appeared since the first check
    fresh = not out.exists()
    (out.parent if fresh else out).mkdir(parents=True, exist_ok=True)
    tmp = (out.parent if fresh else out) / f"{_TMP}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # the mode any new directory gets (mkdtemp's 0700 would hide it from the group)
    try:
        write(tmp)
        files = sorted(_entries(tmp))
        marker = json.dumps({**about, "files": files}, indent=1)
        if fresh:
            (tmp / MARKER).write_text(marker)
            os.replace(tmp, out)  # fails if someone else filled `out` meanwhile
            return
        old = _listed(out)
        atomic_write(out / MARKER, json.dumps({**about, "files": sorted(old | set(files))}))
        leftovers = [p for p in out.iterdir() if p.name.startswith(_TMP) and p != tmp]
        for rel in sorted(old & _entries(out), reverse=True):  # files before their folder
            path = out / rel
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # fails rather than delete what someone else put there
            else:
                path.unlink(missing_ok=True)
        for leftover in leftovers:  # a killed export's temporary directory
            shutil.rmtree(leftover, ignore_errors=True)
        for name in os.listdir(tmp):
            os.replace(tmp / name, out / name)
        atomic_write(out / MARKER, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_policy(module, out_dir: str | Path, *, source: str | None = None) -> Path:
    """Save `module.policy` and its tokenizer to `out_dir`: a new or empty directory, or a
    previous export (replaced); anything else is refused before any work (`check_target`).

    A LoRA policy is saved merged. A policy sharded with FSDP2 is gathered first: every rank
    must call this, and rank 0 writes. `source` (e.g. the checkpoint) is noted in the marker."""
    from transformers import AutoTokenizer

    out = Path(out_dir).resolve()
    policy, state = module.policy, None
    if isinstance(policy, FSDPModule):  # sharded: gather the full weights, rank 0 writes
        state = get_model_state_dict(
            policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if torch.distributed.get_rank() != 0:
            return out
    check_target(out)
    hp = module.hparams
    tokenizer = AutoTokenizer.from_pretrained(
        resolve(hp.model_name_or_path), trust_remote_code=hp.trust_remote_code
    )
    if hasattr(policy, "merge_and_unload"):  # LoRA: the base with the adapters folded in
        policy = copy.deepcopy(policy).merge_and_unload()

    def write(tmp: Path) -> None:
        policy.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    about = {"written_by": "lit_dpo", "model_name_or_path": hp.model_name_or_path}
    _write_export(out, write, about | ({"source": str(source)} if source else {}))
    return out


# -- reading checkpoints without running their pickles -----------------------------------------

_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name ("torch.strided")
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # StorageMeta.checkpoint_id
    ("collections", "OrderedDict"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint `.metadata` (dataclasses of names, shapes,
    dtypes and file offsets) and refuses every other global (`os.system`, ...) before it is
    imported, let alone called."""

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


class _Reader(FileSystemReader):
    """A FileSystemReader that hands out metadata read beforehand (by `_MetadataUnpickler`)."""

    def __init__(self, path: Path, metadata):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self):
        return self.metadata


def _read_metadata(path: Path):
    """The `.metadata` of a sharded checkpoint, through `_MetadataUnpickler`; one line if not."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}/.metadata pickles {err}, which sharded checkpoint metadata never holds: "
            f"not unpickled ({_TRUST})"
        ) from None
    except Exception as err:  # truncated or not a pickle at all
        raise ValueError(f"{path}/.metadata is unreadable ({err!r})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path}/.metadata is not torch.distributed.checkpoint metadata")
    metadata.storage_meta = metadata.storage_meta or StorageMeta()
    return metadata


class _PlainBytesPlanner(DefaultLoadPlanner):
    """Reads a checkpoint's pickled non-tensor entries (the optimizer's settings) with
    `weights_only`, where torch's own planner unpickles them in full; keeps what it refused
    (raising here would come back wrapped in torch's CheckpointException)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False)
        self.refused: dict[str, str] = {}  # {entry: the global it pickles}

    def load_bytes(self, read_item, value) -> None:
        name = read_item.dest_index.fqn
        try:
            self.state_dict[name] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            self.refused[name] = _refused(err)


def check_sharded(path: str | Path) -> None:
    """Refuse, in one line, a sharded checkpoint that holds pickled code: resuming from it
    (Lightning and torch.distributed.checkpoint) would unpickle its `.metadata` and its
    non-tensor entries in full. Read here with an allow-list and `weights_only` instead."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    metadata = _read_metadata(path)
    entries = [k for k, md in metadata.state_dict_metadata.items()
               if isinstance(md, BytesStorageMetadata)]  # fmt: skip
    planner = _PlainBytesPlanner()
    dcp.load(dict.fromkeys(entries), storage_reader=_Reader(path, metadata), planner=planner,
             no_dist=True)  # fmt: skip
    if planner.refused:
        name, what = next(iter(planner.refused.items()))
        raise ValueError(
            f"{path}: entry {name!r} pickles {what}: not unpickled (resume only from a checkpoint "
            "that holds tensors and plain values)"
        )
    if (path / "meta.pt").is_file():
        _torch_load(path / "meta.pt", trust=False)


def _load_sharded(path: Path) -> dict:
    """The model weights (`state_dict`) and the Trainer's entries (`meta.pt`: hyperparameters,
    ...) of a sharded checkpoint, consolidated on CPU. Only tensors are read, each with
    `weights_only`; the pickled non-tensor entries (optimizer settings) are never loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _read_metadata(path)
    weights = {
        name: torch.empty(md.size, dtype=md.properties.dtype)
        for name, md in metadata.state_dict_metadata.items()
        if name.startswith("state_dict.") and isinstance(md, TensorStorageMetadata)
    }
    dcp.load(weights, storage_reader=_Reader(path, metadata), no_dist=True)
    checkpoint = _torch_load(path / "meta.pt", trust=False) if (path / "meta.pt").is_file() else {}
    checkpoint["state_dict"] = {k.removeprefix("state_dict."): v for k, v in weights.items()}
    return checkpoint


def _refused(err: pickle.UnpicklingError) -> str:
    """The global a `weights_only` load refused, from torch's message."""
    found = re.search(r"GLOBAL (\S+)", str(err))
    return found.group(1) if found else "objects beyond tensors and plain values"


def _torch_load(path: Path, trust: bool) -> dict:
    """`torch.load`: tensors and plain values only, unless trusted; one line if refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} pickles {_refused(err)}: not unpickled ({_TRUST})") from None


def _load_module(path: Path, trust: bool) -> DPOModule:
    """The DPOModule of a `.ckpt` file or a sharded checkpoint directory; one line for
    anything else (a Hugging Face export, a folder of other files, a file of another kind)."""
    if not path.exists():
        raise FileNotFoundError(f"--ckpt_path {path}: no such file or directory")
    sharded = path.is_dir() and (path / ".metadata").is_file()
    if path.is_dir() and not sharded:
        if (path / "config.json").is_file():
            raise ValueError(
                f"{path} is already a Hugging Face model directory (config.json): there is no "
                "checkpoint to convert; load it with from_pretrained, or give --ckpt_path a "
                ".ckpt file or sharded checkpoint directory written by lit-dpo fit"
            )
        raise ValueError(
            f"{path} is a directory but not a sharded checkpoint (no .metadata): give "
            "--ckpt_path a .ckpt file or sharded checkpoint directory written by lit-dpo fit"
        )
    if not sharded and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ValueError(f"{path} is not a checkpoint written by lit-dpo fit (.ckpt)")
    if sharded and trust:
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(path)  # plain pickle: runs what it holds
    else:
        checkpoint = _load_sharded(path) if sharded else _torch_load(path, trust)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a lit-dpo checkpoint (no hyper_parameters, state_dict)")
    if hparams.get("trust_remote_code") and not trust:
        raise ValueError(
            f"{path} sets trust_remote_code: loading its model "
            f"({hparams.get('model_name_or_path')}) runs that repository's code; {_TRUST}"
        )
    if not sharded:  # Lightning's loader: hparams filtered, on_load_checkpoint, strict keys
        return DPOModule.load_from_checkpoint(path, map_location="cpu", weights_only=not trust)
    module = DPOModule(**hparams)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)  # as Lightning's loader does: rebuilt keys filled in
    module.load_state_dict(checkpoint["state_dict"])
    return module


def export_checkpoint(*, ckpt_path: str, output_dir: str, trust_checkpoint: bool = False) -> None:
    """Export the policy of a lit-dpo checkpoint to a Hugging Face directory.

    Args:
        ckpt_path: a `.ckpt` written by `lit-dpo fit` (e.g. `runs/<name>/checkpoints/last.ckpt`),
            or the directory of a sharded checkpoint (ModelParallelStrategy).
        output_dir: where to write `model.safetensors`, `config.json` and the tokenizer: a new
            or empty directory, or a previous export (replaced). Anything else is refused.
        trust_checkpoint: unpickle everything the checkpoint holds and honour its
            `trust_remote_code`. Pickles can run any code: only for checkpoints whose writer
            you trust. Off, only tensors and plain values are read.
    """
    out = Path(output_dir).resolve()
    check_target(out, "--output_dir")  # before loading anything
    module = _load_module(Path(ckpt_path), trust_checkpoint)
    print(f"exported {ckpt_path} -> {export_policy(module, out, source=ckpt_path)}")


class HFExport(Callback):
    """Write the policy in Hugging Face format when `fit` ends.

    Args:
        dirpath: target directory: new, empty, or a previous export (replaced when fit ends).
            A directory holding anything else, or one the run writes into (default_root_dir,
            the log or checkpoint directory), is refused when fit starts. None: `<log_dir>/hf`
            (the run's log directory, or `default_root_dir` without a logger).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def check(self, trainer: L.Trainer) -> Path:
        """The target directory, refused on every rank if it may not take the export: rank 0
        looks, the others hear its verdict."""
        log_dir = trainer.log_dir  # on every rank: the Trainer broadcasts it
        out = Path(self.dirpath or os.path.join(log_dir or trainer.default_root_dir, "hf"))
        out = out.resolve()
        problem = self._problem(out, trainer, log_dir) if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise ValueError(problem)
        return out

    @staticmethod
    def _problem(out: Path, trainer: L.Trainer, log_dir: str | None) -> str | None:
        own = [("default_root_dir", trainer.default_root_dir), ("log directory", log_dir)]
        own += [("checkpoint directory", c.dirpath) for c in trainer.checkpoint_callbacks]
        for what, path in own:
            if path and (out == Path(path).resolve() or out in Path(path).resolve().parents):
                return (
                    f"--export.dirpath {out} is or holds the run's {what} ({path}), where the "
                    "run writes its own files: pick a new or empty --export.dirpath"
                )
        try:
            check_target(out, "--export.dirpath")
        except ValueError as err:
            return str(err)
        return None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before the model loads: the user learns at once
            self.check(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)  # now every checkpoint directory is known

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.check(trainer)  # again: a file may have appeared there during training
        if trainer.is_global_zero or isinstance(pl_module.policy, FSDPModule):
            export_policy(pl_module, out)  # sharded: every rank takes part in the gather
        if trainer.is_global_zero:
            print(f"policy exported to {out}")
        trainer.strategy.barrier()
