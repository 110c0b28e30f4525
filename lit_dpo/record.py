"""What a checkpoint was made from (`PolicyModule.run_record`, stored in it as `"lit_dpo"`), and
the words for each way a run resuming it differs."""

from __future__ import annotations

import json

# Config fields that say how a model was saved or is run, not what it is.
VOLATILE_CONFIG = {
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "output_attentions", "output_hidden_states", "return_dict",
}  # fmt: skip


def config_record(config) -> str:
    """A model's architecture: its config (a transformers `PretrainedConfig`) as sorted JSON,
    without the fields that only say how it was saved or is run."""
    fields = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG}
    return json.dumps(fields, sort_keys=True, default=str)


def differences(saved: dict, current: dict) -> list[str]:
    """Each entry of a checkpoint's record that this run's record has otherwise, in words.
    Entries only one side has (an older checkpoint's record) are not compared."""
    sources = saved.get("sources", {}), current["sources"]
    return [
        _difference(key, saved[key], current[key], *sources)
        for key in saved
        if key != "sources" and key in current and saved[key] != current[key]
    ]


def _difference(key: str, saved, current, saved_sources: dict, sources: dict) -> str:
    """One difference between a checkpoint's record and this run's, as "<then>, this run has
    <now>"."""
    if key == "model config":
        old, new = json.loads(saved), json.loads(current)
        keys = [k for k in sorted(old.keys() & new.keys()) if old[k] != new[k]][:4]
        if not keys:  # fields only one side has (another transformers version or model type)
            return "a model of another kind, this run's model is not"
        then = ", ".join(f"{k}={old[k]!r}" for k in keys)
        now = ", ".join(f"{k}={new[k]!r}" for k in keys)
        return f"a model with {then}, this run's model has {now}"
    if key in ("model weights", "reference weights"):
        role = key.split()[0]
        then, now = saved_sources.get(role), sources.get(role)
        if current is None or saved is None:  # a reference model given on one side only
            return f"{role} path {then!r}, this run has {now!r}"
        memory = saved.startswith("memory:"), current.startswith("memory:")
        if memory[0] != memory[1]:  # an object on one side, files on the other
            return (
                f"{role} {then!r}, this run's {role} is {now!r} (an object's weights are "
                "compared in memory, a path's by its files: give it the same way)"
            )
        if memory[1]:
            return (
                f"the {role} weights of {then!r}, this run's {role} {now!r} holds other weights "
                "(a model object trains in place: pass one holding the initial weights)"
            )
        return (
            f"the {role} weights of {then!r}, this run's {role} {now!r} has different weight files"
        )
    if key == "tokenizer":
        return (
            f"tokenizer {saved_sources.get('tokenizer')!r} ({saved}), this run has tokenizer "
            f"{sources.get('tokenizer')!r} ({current})"
        )
    if key == "chat template":  # hashes: only that they differ says anything
        return "another chat template, this run's differs (data.chat_template or the tokenizer's)"
    return f"{key}={saved!r}, this run has {key}={current!r}"
