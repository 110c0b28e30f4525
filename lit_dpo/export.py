"""The trained policy in Hugging Face format: safetensors + config + tokenizer + model card
(`README.md`, `lit_dpo.card`), loadable by `AutoModelForCausalLM.from_pretrained(dir)`; or, for
a LoRA policy, the adapter alone (`adapter_model.safetensors` + `adapter_config.json`), loadable
by `peft.AutoPeftModelForCausalLM.from_pretrained(dir)`.

Two rules. An export never deletes a file lit_dpo did not write: it goes to a new or empty
directory, or replaces a previous export, which a marker file lists file by file (and a card the
user edited since is the user's); anything else is refused before any work. And no pickle from a
checkpoint runs code unless the user passes `trust_checkpoint` (`lit_dpo.checkpoints`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from lit_dpo.card import RECORD, checkpoint_facts, model_card, run_facts
from lit_dpo.checkpoints import load_module
from lit_dpo.data.tokenize import chat_template_text
from lit_dpo.hub import load_tokenizer
from lit_dpo.utils import atomic_write, finite_json

__all__ = ["HFExport", "check_target", "export_checkpoint", "export_policy", "policy_tokenizer"]

MARKER = ".lit_dpo_export.json"  # in every export: what it came from and the files it holds
CARD = "README.md"  # the model card, as the Hub reads it
_TMP = ".lit_dpo_export.tmp-"  # the export being written (a killed one's leftovers are ours too)
_GUARDED = (CARD,)  # ours only while unchanged: a card the user edited is the user's


# -- where an export may go -------------------------------------------------------------------


def _entries(directory: Path) -> set[str]:
    """Every file and folder under `directory`, as relative POSIX paths."""
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listed(directory: Path) -> set[str]:
    """The paths a previous export's marker lists (none without a readable marker), less a
    guarded file (the card) changed since: the user's edits are never overwritten."""
    try:
        marker = json.loads((directory / MARKER).read_text())
        listed, digests = set(marker["files"]), marker.get("sha256") or {}
        edited = {
            rel for rel in _GUARDED
            if rel in digests and (directory / rel).is_file()
            and _sha256(directory / rel) != digests[rel]
        }  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return listed - edited


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
        digests = {rel: _sha256(tmp / rel) for rel in _GUARDED if (tmp / rel).is_file()}
        marker = finite_json({**about, "files": files, "sha256": digests}, indent=1)
        if fresh:
            (tmp / MARKER).write_text(marker)
            os.replace(tmp, out)  # fails if someone else filled `out` meanwhile
            return
        old = _listed(out)
        atomic_write(out / MARKER, finite_json({**about, "files": sorted(old | set(files))}))
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


def export_policy(
    module,
    out_dir: str | Path,
    *,
    adapter: bool = False,
    source: str | None = None,
    facts: dict | None = None,
    tokenizer=None,
) -> Path:
    """Save `module.policy`, its tokenizer and a model card (`README.md`) to `out_dir`: a new or
    empty directory, or a previous export (replaced); anything else is refused before any work
    (`check_target`).

    A LoRA policy is saved merged, or with `adapter` as the peft adapter alone (a policy without
    LoRA is refused). A policy sharded with FSDP2 is gathered first: every rank must call this,
    and rank 0 writes. `source` (e.g. the checkpoint) is noted in the marker and the card.
    `facts`: the run's steps, data and metrics for the card (`run_facts`); None: those of the
    Trainer the module was fitted by, if any. `tokenizer`: None: `policy_tokenizer(module)`."""
    if adapter:
        _refuse_adapter_without_lora(module, "adapter=True")
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
    tokenizer = tokenizer or policy_tokenizer(module)
    if hasattr(policy, "merge_and_unload") and not adapter:  # the base, adapters folded in
        policy = copy.deepcopy(policy).merge_and_unload()
    if facts is None:
        trainer = getattr(module, "_trainer", None)
        facts = run_facts(trainer) if trainer is not None else {}
    card = model_card(module, facts, name=out.name, adapter=adapter, source=source)

    def write(tmp: Path) -> None:
        policy.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD).write_text(card, encoding="utf-8")  # after peft, which writes a card too

    about = {"written_by": "lit_dpo", "model_name_or_path": hp.model_name_or_path}
    about |= {"adapter": adapter} | ({"source": str(source)} if source else {})
    _write_export(out, write, about)
    return out


def policy_tokenizer(module):
    """The policy's tokenizer: the one the run's data module loaded, else the policy's own (what
    an export ships, and what samples are decoded with)."""
    datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
    tokenizer = getattr(datamodule, "tokenizer", None)
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    hp = module.hparams
    path = getattr(module, "model_path", hp.model_name_or_path)  # an object: its source's
    if path is None:
        raise ValueError(
            "the policy is a model object not loaded from files, and no data module holds a "
            "tokenizer: pass the tokenizer to PreferenceDataModule(tokenizer=...)"
        )
    return load_tokenizer(path, hp.trust_remote_code, hp.get("revision"))


def checkpoint_tokenizer(module, checkpoint: dict):
    """The tokenizer a checkpoint's run trained with: its data module's (`data.tokenizer` when
    given by name, and `data.chat_template`), else the policy's own."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    name, hp = data.get("tokenizer"), module.hparams
    if isinstance(name, str):
        tokenizer = load_tokenizer(name, hp.trust_remote_code, data.get("tokenizer_revision"))
    else:
        tokenizer = policy_tokenizer(module)
    if data.get("chat_template") is not None:
        tokenizer.chat_template = chat_template_text(data["chat_template"])
    return tokenizer


def _refuse_adapter_without_lora(module, option: str) -> None:
    """A policy without adapters (no `lora`, not a peft model) has none to export."""
    policy = module.policy
    if policy is None and hasattr(module, "model_source"):  # not built yet: a model object?
        policy = module.model_source()
    if module.hparams.get("lora") is None and not hasattr(policy, "peft_config"):
        raise ValueError(
            f"{option} exports the LoRA adapter, but the policy has none (it trains every "
            "weight, lora unset): export the whole model (the default), or train with lora"
        )


def export_checkpoint(
    *, ckpt_path: str, output_dir: str, adapter: bool = False, trust_checkpoint: bool = False
) -> None:
    """Export the policy of a lit-dpo checkpoint to a Hugging Face directory, with a model
    card (`README.md`: base model, data, loss, steps, and the metrics when the checkpoint
    records them).

    Args:
        ckpt_path: a `.ckpt` written by `lit-dpo fit` (e.g. `runs/<name>/checkpoints/last.ckpt`),
            or the directory of a sharded checkpoint (ModelParallelStrategy).
        output_dir: where to write `model.safetensors`, `config.json`, the tokenizer and the
            card: a new or empty directory, or a previous export (replaced). Anything else is
            refused.
        adapter: for a policy trained with LoRA, write the peft adapter alone
            (`adapter_model.safetensors`, `adapter_config.json`) instead of the merged model.
        trust_checkpoint: unpickle everything the checkpoint holds and honour its
            `trust_remote_code`. Pickles can run any code: only for checkpoints whose writer
            you trust. Off, only tensors and plain values are read.
    """
    out = Path(output_dir).resolve()
    check_target(out, "--output_dir")  # before loading anything
    module, checkpoint = load_module(Path(ckpt_path), trust_checkpoint)
    if adapter:
        _refuse_adapter_without_lora(module, f"--adapter true ({ckpt_path})")
    facts, tokenizer = checkpoint_facts(checkpoint), checkpoint_tokenizer(module, checkpoint)
    written = export_policy(
        module, out, adapter=adapter, source=ckpt_path, facts=facts, tokenizer=tokenizer
    )
    print(f"exported {ckpt_path} -> {written}")


class HFExport(Callback):
    """Write the policy in Hugging Face format, with a model card (`README.md`), when `fit`
    ends. Every checkpoint the run saves also notes the data and the last metrics, for the
    card of a later `lit-dpo export` of it.

    Args:
        dirpath: target directory: new, empty, or a previous export (replaced when fit ends).
            A directory holding anything else, or one the run writes into (default_root_dir,
            the log or checkpoint directory), is refused when fit starts. None: `<log_dir>/hf`
            (the run's log directory, or `default_root_dir` without a logger).
        adapter: for a policy trained with LoRA, write the peft adapter alone
            (`adapter_model.safetensors`, `adapter_config.json`, loadable with
            `peft.AutoPeftModelForCausalLM`) instead of the merged model. Refused when fit
            starts if the model has no LoRA.
    """

    def __init__(self, dirpath: str | None = None, adapter: bool = False):
        self.dirpath = dirpath
        self.adapter = adapter

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
            if self.adapter:
                _refuse_adapter_without_lora(pl_module, "--export.adapter true")
            self.check(trainer)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)  # now every checkpoint directory is known

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.check(trainer)  # again: a file may have appeared there during training
        if trainer.is_global_zero or isinstance(pl_module.policy, FSDPModule):
            export_policy(pl_module, out, adapter=self.adapter)  # sharded: every rank gathers
        if trainer.is_global_zero:
            print(f"policy exported to {out}")
        trainer.strategy.barrier()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        facts = run_facts(trainer)  # plain values: read back with weights_only
        checkpoint[RECORD] = {"data": facts["data"], "metrics": facts["metrics"]}
