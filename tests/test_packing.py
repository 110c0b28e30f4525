"""Packing by default: `packing="auto"` packs a batch when that saves rows and the module reads
packed batches, and pads otherwise, with the padded run's losses."""

import functools
import logging
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import write_jsonl
from lit_dpo.data import PreferenceDataModule, collate_sequences
from lit_dpo.logps import packing_unsupported
from lit_dpo.module import DPOModule
from lit_dpo.sft import SFTModule

# Registered under a name lit_dpo does not know: a custom kernel it cannot vouch for.
AttentionInterface.register("my_kernel", sdpa_attention_forward)


@pytest.fixture
def varied_pairs(tmp_path):
    """12 pairs: one long chosen reply among short ones, so most batches pack into fewer rows."""
    rows = [
        {"prompt": f"Q{i}: " + "why " * (1 + i % 3), "chosen": " yes" * (1 + 12 * (i % 4 == 0)),
         "rejected": " no"}
        for i in range(12)
    ]  # fmt: skip
    return str(write_jsonl(tmp_path / "pairs.jsonl", rows))


class Batches(Callback):
    def __init__(self):
        self.packed, self.losses = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.packed.append("row_ids" in batch)
        self.losses.append(outputs["loss"].item())


def fit(module, data, tmp_path, steps=3):
    batches = Batches()
    L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=str(tmp_path), callbacks=[batches],
    ).fit(module, data)  # fmt: skip
    return batches


def dpo(model):
    L.seed_everything(0)
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    return DPOModule(model, optimizer=sgd, lr_scheduler=None)


def data(path, tokenizer, **kwargs):
    return PreferenceDataModule(path, tokenizer=tokenizer, batch_size=3, val_fraction=0, seed=1,
                                **kwargs)  # fmt: skip


def test_auto_collate_packs_only_when_that_saves_rows():
    short = [([1, 2], [3]), ([1], [4, 5]), ([1, 2, 3, 4], [5, 6, 7, 8])]  # 3, 3, 8 tokens
    packed = collate_sequences(short, pad_token_id=0, packing="auto")
    assert packed["input_ids"].shape == (2, 8) and packed["n_rows"] == 3  # 3 + 3 share a row
    even = [([1, 2], [3, 4]), ([1, 2], [5, 6]), ([1, 2, 3], [4])]  # 4 tokens each: no saving
    padded = collate_sequences(even, pad_token_id=0, packing="auto")
    assert "attention_mask" in padded and "row_ids" not in padded
    assert padded.keys() == collate_sequences(even, pad_token_id=0).keys()
    forced = collate_sequences(even, pad_token_id=0, packing=True)
    assert forced["input_ids"].shape == (3, 4) and "row_ids" in forced


def test_which_models_read_packed_batches(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert packing_unsupported(model) is None
    model.set_attn_implementation("eager")
    assert packing_unsupported(model) is None
    model.set_attn_implementation("my_kernel")
    assert "'my_kernel' is not one of sdpa, eager" in packing_unsupported(model)

    class OwnMask(nn.Module):  # a model with its own attention code (remote code, say)
        config = model.config

    model.set_attn_implementation("sdpa")
    assert "OwnMask does not build its mask" in packing_unsupported(OwnMask())


def test_dpo_packs_by_default_with_the_padded_losses(tiny_model_dir, varied_pairs, tmp_path):
    auto = fit(dpo(tiny_model_dir), data(varied_pairs, tiny_model_dir), tmp_path)
    padded = fit(dpo(tiny_model_dir), data(varied_pairs, tiny_model_dir, packing=False), tmp_path)
    assert any(auto.packed) and not any(padded.packed)
    assert auto.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert auto.losses == pytest.approx(padded.losses, abs=1e-5)
    assert auto.losses[-1] < auto.losses[0]


def test_a_model_that_cannot_read_packed_batches_gets_padded_ones(
    tiny_model_dir, varied_pairs, tmp_path, caplog
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="my_kernel")
    with caplog.at_level(logging.INFO):
        batches = fit(dpo(model), data(varied_pairs, tiny_model_dir), tmp_path, steps=2)
    assert not any(batches.packed)
    notes = [r.getMessage() for r in caplog.records if "data.packing" in r.getMessage()]
    assert notes == [
        "data.packing=auto: padded batches, since the model's attention 'my_kernel' is not one "
        "of sdpa, eager, flash_attention_2, flash_attention_3, flex_attention"
    ]
    with pytest.raises(ValueError, match=r"^data.packing=true, but the model's attention "):
        fit(dpo(model), data(varied_pairs, tiny_model_dir, packing=True), tmp_path, steps=1)


def test_sft_gets_padded_batches_and_refuses_packing(tiny_model_dir, varied_pairs, tmp_path):
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    batches = fit(SFTModule(tiny_model_dir, optimizer=sgd), data(varied_pairs, tiny_model_dir),
                  tmp_path, steps=2)  # fmt: skip
    assert batches.packed == [False, False]
    module = SFTModule(tiny_model_dir, optimizer=sgd)
    with pytest.raises(ValueError, match="^data.packing=true, but SFTModule takes padded"):
        fit(module, data(varied_pairs, tiny_model_dir, packing=True), tmp_path, steps=1)


def test_packing_must_be_true_false_or_auto(tiny_model_dir, varied_pairs):
    with pytest.raises(ValueError, match="packing must be true, false or auto, got 'yes'"):
        data(varied_pairs, tiny_model_dir, packing="yes")
