"""What comes out: every export carries a model card (README.md) that says what was trained and
how well; a LoRA policy exports merged (the default) or as its peft adapter, and both give the
same log-probs."""

import functools
import json
import os

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file
from test_export_safety import export
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl
from lit_dpo.data import PreferenceDataModule
from lit_dpo.export import MARKER, RECORD, HFExport, export_policy
from lit_dpo.logps import sequence_logps
from lit_dpo.module import DPOModule

PAIRS = [(" a delight.", " boring."), (" wonderful.", " terrible."), (" great music!", " weak."),
         (" loved it.", " I left."), (" warm.", " dull."), (" bright.", " slow.")]  # fmt: skip
ROWS = [
    {"prompt": f"Review film {i}:", "chosen": c, "rejected": r} for i, (c, r) in enumerate(PAIRS)
]


def run(model_dir, root, callbacks, **module_kwargs):
    """A 3-step fit on 6 train pairs (batch 2: one epoch, then validation on 2 pairs), with a
    CSV logger; the checkpoint saved after it at `root/last.ckpt`. Returns (module, trainer)."""
    data_dir = root / "pairs"
    data_dir.mkdir(parents=True)
    write_jsonl(data_dir / "train.jsonl", ROWS)
    write_jsonl(data_dir / "validation.jsonl", ROWS[:2])
    L.seed_everything(0)
    module = DPOModule(
        model_dir,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        lr_scheduler=None,
        **module_kwargs,
    )
    data = PreferenceDataModule(str(data_dir), tokenizer=model_dir, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=CSVLogger(root / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(root / "last.ckpt")
    return module, trainer


def card(directory):
    """(the YAML metadata, the text below it) of an export's README.md."""
    _, header, body = (directory / "README.md").read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(header), body


def section(body, title):
    return body.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


@pytest.fixture(scope="module")
def dpo(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    module, trainer = run(tiny_model_dir, root, [HFExport(str(root / "hf"))], beta=0.3,
                          label_smoothing=0.1)  # fmt: skip
    return module, trainer, root


def test_a_fit_with_hfexport_writes_a_card_with_its_beta_steps_and_metrics(dpo, tiny_model_dir):
    module, trainer, root = dpo
    meta, body = card(root / "hf")
    # A local base model and local data: no Hub ids to name in the metadata.
    assert meta == {"library_name": "transformers", "tags": ["dpo", "lit-dpo"]}
    training = section(body, "Training")
    assert f"| base model | `{tiny_model_dir}` |" in training
    assert f"| data | `{root / 'pairs'}`: 6 train, 2 validation pairs |" in training
    assert "| loss | `sigmoid` x 1; beta 0.3; label smoothing 0.1 |" in training
    assert "| reference | `copy`: a frozen copy of the base model |" in training
    assert "| trained | 3 optimizer steps |" in training
    metrics = section(body, "Final metrics")
    for key in ("val/loss", "val/rewards/accuracies", "val/rewards/margins", "train/loss",
                "train/rewards/accuracies", "train/rewards/margins"):  # fmt: skip
        assert f"| `{key}` | {float(trainer.callback_metrics[key]):.4g} |" in metrics, key
    assert 'AutoModelForCausalLM.from_pretrained("hf")' in section(body, "Use")
    marker = json.loads((root / "hf" / MARKER).read_text())
    assert "README.md" in marker["files"] and "README.md" in marker["sha256"]
    AutoModelForCausalLM.from_pretrained(root / "hf")
    AutoTokenizer.from_pretrained(root / "hf")


def test_lit_dpo_export_of_its_checkpoint_writes_the_same_card(dpo, tmp_path):
    module, trainer, root = dpo
    assert export("--ckpt_path", root / "last.ckpt", "--output_dir", tmp_path / "x") is None
    _, fitted = card(root / "hf")
    meta, body = card(tmp_path / "x")
    assert meta == {"library_name": "transformers", "tags": ["dpo", "lit-dpo"]}
    assert section(body, "Final metrics") == section(fitted, "Final metrics")  # noted by HFExport
    training = section(body, "Training")
    assert section(fitted, "Training") in training  # the same rows, and one more:
    assert f"| exported from | `{root / 'last.ckpt'}` |" in training


def test_a_checkpoint_without_the_note_says_what_it_does_not_know(dpo, tmp_path):
    """A checkpoint written without HFExport (plain Lightning code): the step and the data
    module's source come from what Lightning stores; the metrics are said to be unrecorded."""
    module, trainer, root = dpo
    checkpoint = torch.load(root / "last.ckpt", weights_only=True)
    del checkpoint[RECORD]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    assert export("--ckpt_path", tmp_path / "plain.ckpt", "--output_dir", tmp_path / "x") is None
    _, body = card(tmp_path / "x")
    assert f"| data | `{root / 'pairs'}`; pairs per split not recorded |" in body
    assert "| trained | 3 optimizer steps |" in body
    assert section(body, "Final metrics").startswith("Not recorded: the checkpoint was written")


def test_a_re_export_replaces_the_card_but_never_one_the_user_edited(dpo, tmp_path):
    module, trainer, root = dpo
    out = export_policy(module, tmp_path / "hf")
    first = (out / "README.md").read_text()
    assert "| trained | 3 optimizer steps |" in first  # the trainer the module was fitted by
    assert export_policy(module, out) == out and (out / "README.md").read_text() == first

    (out / "README.md").write_text(first + "\nMy notes on this model.\n")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(ValueError, match=r"lit_dpo did not write \(README.md\)"):
        export_policy(module, out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_adapter_export_is_refused_in_one_line_without_lora(dpo, tiny_model_dir, tmp_path):
    module, trainer, root = dpo
    error = export("--ckpt_path", root / "last.ckpt", "--output_dir", tmp_path / "x",
                   "--adapter", "true")  # fmt: skip
    assert error.startswith(f"lit-dpo: error: --adapter true ({root / 'last.ckpt'}) exports")
    assert "the policy has none" in error and not (tmp_path / "x").exists()

    fresh = DPOModule(tiny_model_dir)  # refused when fit starts, before the model loads
    callback = HFExport(str(tmp_path / "y"), adapter=True)
    with pytest.raises(ValueError, match="--export.adapter true exports the LoRA adapter"):
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[callback]).fit(
            fresh, PreferenceDataModule(str(root / "pairs"), tokenizer=tiny_model_dir)
        )
    assert fresh.policy is None and not (tmp_path / "y").exists()


def test_lora_exports_as_an_adapter_with_the_merged_models_log_probs(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    adapter_dir = tmp_path / "adapter"
    module, trainer = run(tiny_model_dir, tmp_path, [HFExport(str(adapter_dir), adapter=True)],
                          lora={"r": 4})  # fmt: skip
    merged_dir = export_policy(module, tmp_path / "merged")  # the default: merged

    files = set(os.listdir(adapter_dir))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    assert "tokenizer.json" in files and "model.safetensors" not in files
    meta, body = card(adapter_dir)
    assert meta["library_name"] == "peft"
    assert "| LoRA | r 4, alpha 16, dropout 0.0, target_modules all-linear; exported as the " \
           "adapter alone |" in body  # fmt: skip
    assert "`adapter`: the base model (the policy with its LoRA adapters switched off)" in body
    assert "merged into these weights" in (merged_dir / "README.md").read_text()

    batch = next(iter(trainer.datamodule.train_dataloader()))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    on_base = PeftModel.from_pretrained(base, adapter_dir).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    with torch.no_grad():
        want = sequence_logps(merged, batch).sum
        for model in (on_base, auto):
            torch.testing.assert_close(sequence_logps(model, batch).sum, want, atol=1e-5, rtol=0)
        with on_base.disable_adapter():  # the adapter has moved the log-probs
            assert not torch.allclose(sequence_logps(on_base, batch).sum, want, atol=1e-3)
    AutoTokenizer.from_pretrained(adapter_dir)

    # `lit-dpo export --adapter true` of the run's checkpoint: the same adapter weights.
    cli = tmp_path / "cli"
    assert (
        export("--ckpt_path", tmp_path / "last.ckpt", "--output_dir", cli, "--adapter", "true")
        is None
    )
    ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (adapter_dir, cli))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], atol=0, rtol=0)


def test_the_runs_chat_template_goes_into_exports_and_resumes(tiny_model_dir, tmp_path):
    """A run trained with data.chat_template: `lit-dpo export` of its checkpoint ships that
    template (not the model's own), and resuming it with another template is refused."""
    from lit_dpo.export import export_checkpoint

    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    data_file = write_jsonl(tmp_path / "pairs.jsonl", ROWS)

    def fit(steps, chat_template=None, ckpt_path=None):
        L.seed_everything(0)
        module = DPOModule(tiny_model_dir, lr_scheduler=None)
        data = PreferenceDataModule(str(data_file), tokenizer=tiny_model_dir, batch_size=2,
                                    val_fraction=0, chat_template=chat_template)  # fmt: skip
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer

    fit(1, chat_template=template).save_checkpoint(tmp_path / "last.ckpt")
    export_checkpoint(ckpt_path=str(tmp_path / "last.ckpt"), output_dir=str(tmp_path / "out"))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == template
    assert AutoTokenizer.from_pretrained(tiny_model_dir).chat_template != template
    fit(2, chat_template=template, ckpt_path=str(tmp_path / "last.ckpt"))  # the same: resumes
    with pytest.raises(ValueError, match="was trained with another chat template, this run's"):
        fit(2, ckpt_path=str(tmp_path / "last.ckpt"))
