"""Faults: SIGKILL then resume gives the uninterrupted weights; Ctrl-C saves a checkpoint; a
non-finite loss stops the run naming the step and batch."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_dpo.data import PreferenceDataModule
from lit_dpo.module import DPOModule

SCRIPT = Path(__file__).parent / "scripts" / "resume_fit.py"
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """10 pairs of different lengths: batches differ, so the data order shows in the weights."""
    path = tmp_path_factory.mktemp("faults") / "pairs.jsonl"
    rows = [
        {"prompt": f"Review film {i}:", "chosen": " a delight" + "!" * i, "rejected": " boring"}
        for i in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fit(tiny_model_dir, pairs_file, out, *flags, max_steps=8):
    return subprocess.run(
        [sys.executable, str(SCRIPT), tiny_model_dir, pairs_file, str(out), str(max_steps), *flags],
        cwd=out.parent, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_model_dir, pairs_file, tmp_path):
    """8 steps of 2 pairs over 10 pairs: the kill at step 3 is mid-epoch, and the resumed run
    crosses into a second, reshuffled epoch."""
    whole = fit(tiny_model_dir, pairs_file, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = fit(tiny_model_dir, pairs_file, tmp_path / "run", "--kill-at", "3")
    assert killed.returncode == -9  # SIGKILL: no chance to clean up
    assert not (tmp_path / "run" / "final.pt").exists()
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = fit(tiny_model_dir, pairs_file, tmp_path / "run", "--resume", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_model_dir, pairs_file, tmp_path):
    run = fit(tiny_model_dir, pairs_file, tmp_path / "run", "--interrupt-at", "2")
    assert run.returncode == 1 and "KeyboardInterrupt" in run.stdout + run.stderr
    saved = tmp_path / "run" / "ckpt" / "interrupted.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == 2
    resumed = fit(tiny_model_dir, pairs_file, tmp_path / "run", "--resume", str(saved))
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_nonfinite_loss_stops_naming_step_and_batch(tiny_model_dir, pairs_file, tmp_path):
    module = DPOModule(tiny_model_dir)
    module.configure_model()
    with torch.no_grad():
        module.policy.lm_head.weight[0, 0] = math.nan  # every log-prob becomes NaN
    data = PreferenceDataModule(pairs_file, tokenizer=tiny_model_dir, batch_size=2, val_split=None)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"step 0, batch 0 \(loss nan\)") as err:
        trainer.fit(module, data)
    saved = tmp_path / "nonfinite-batch-step0-rank0.pt"
    assert str(saved) in str(err.value)
    batch = torch.load(saved, weights_only=True)
    assert batch["input_ids"].shape[0] == 4  # 2 pairs: chosen rows, then rejected rows


def test_resuming_mid_epoch_after_the_first_sees_the_same_batches(tiny_model_dir, tmp_path):
    """A checkpoint taken inside epoch 1 (not 0) resumes to the batches the uninterrupted run
    saw: the sampler must hold epoch 1's order before the loader skips to its position."""
    import functools

    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from conftest import write_jsonl

    rows = [{"prompt": f"Review {i}:", "chosen": " good" * (1 + i % 3), "rejected": " bad"}
            for i in range(12)]  # fmt: skip
    data_file = str(write_jsonl(tmp_path / "pairs.jsonl", rows))

    class Seen(Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batches.append(batch["index"].tolist())

    def run(ckpt_path=None, save=False):
        L.seed_everything(0)
        sgd = functools.partial(torch.optim.SGD, lr=0.1)
        module = DPOModule(tiny_model_dir, optimizer=sgd, lr_scheduler=None)
        data = PreferenceDataModule(data_file, tokenizer=tiny_model_dir, batch_size=2,
                                    val_fraction=0, seed=3)  # fmt: skip
        seen = Seen()
        every = [ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)]
        L.Trainer(
            accelerator="cpu", max_steps=14, logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
            enable_checkpointing=save, callbacks=[seen, *(every if save else [])],
        ).fit(module, data, ckpt_path=ckpt_path)  # fmt: skip
        return seen.batches

    full = run(save=True)  # 6 batches per epoch: step 8 is epoch 1's third batch
    (ckpt,) = (tmp_path / "ckpt").glob("*step=8*")
    assert run(ckpt_path=str(ckpt)) == full[8:]
    assert full[8:12] != full[2:6]  # epoch 1's order is not epoch 0's
