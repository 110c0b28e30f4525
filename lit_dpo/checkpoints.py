"""Reading lit-dpo checkpoints without running their pickles: a `.ckpt` file is loaded with
`weights_only`, a sharded checkpoint's `.metadata` by an unpickler that knows only the
torch.distributed.checkpoint metadata classes and its non-tensor entries with `weights_only`,
unless the user passes `trust_checkpoint`. `load_module` (for `lit-dpo export`) and
`check_sharded` (before resuming from a sharded checkpoint).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from lit_dpo.module import DPOModule

_TRUST = "pass --trust_checkpoint true only if you trust whoever wrote it"

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


def load_module(path: Path, trust: bool) -> tuple[DPOModule, dict]:
    """The DPOModule of a `.ckpt` file or a sharded checkpoint directory, and the checkpoint's
    entries; one line for anything else (a Hugging Face export, a folder of other files, a file
    of another kind)."""
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
        module = DPOModule.load_from_checkpoint(path, map_location="cpu", weights_only=not trust)
        return module, checkpoint
    module = DPOModule(**hparams)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)  # as Lightning's loader does: rebuilt keys filled in
    module.load_state_dict(checkpoint["state_dict"])
    return module, checkpoint
