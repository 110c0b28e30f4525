"""Multi-process runs, launched as subprocesses (in-process DDP inside pytest hangs): FSDP2
sharding with its resume and export, and a precomputed reference under DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl

SCRIPTS = Path(__file__).parent / "scripts"
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture
def pairs_file(tmp_path):
    rows = [
        {"prompt": f"Review film {i}:" + " again" * (i % 5), "chosen": " a delight." * (1 + i % 3),
         "rejected": " boring."}
        for i in range(16)
    ]  # fmt: skip
    return str(write_jsonl(tmp_path / "pairs.jsonl", rows))


def run(script, *args, cwd):
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *map(str, args)],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def losses(out, key="losses"):
    ranks = [json.loads((out / f"losses-rank{r}.json").read_text())[key] for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the global value on both ranks
    return {int(k): v for k, v in ranks[0].items()}


def test_fsdp2_two_processes_resume_and_export(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    full = tmp_path / "full"
    run("fsdp2_fit.py", tiny_model_dir, pairs_file, full, 4, cwd=tmp_path)
    straight = losses(full)
    assert straight[0] == pytest.approx(0.6931472, abs=1e-6) and straight[3] < straight[0]
    ckpts = sorted((full / "checkpoints").iterdir())
    assert ckpts and all(c.is_dir() for c in ckpts)  # sharded: one directory per checkpoint

    # killed after step 2: resume from its sharded checkpoint, end where the straight run ended
    (step2,) = [c for c in ckpts if "step=2" in c.name]
    resumed = tmp_path / "resumed"
    run("fsdp2_fit.py", tiny_model_dir, pairs_file, resumed, 4, step2, cwd=tmp_path)
    again = losses(resumed)
    assert sorted(again) == [2, 3]
    for step in (2, 3):
        assert again[step] == pytest.approx(straight[step], abs=1e-5)

    a, b = (load_file(d / "hf" / "model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)
    exported = AutoModelForCausalLM.from_pretrained(full / "hf")  # one plain HF directory
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    assert exported.state_dict()[name].shape == start.state_dict()[name].shape
    assert not torch.equal(exported.state_dict()[name], start.state_dict()[name])

    # the sharded checkpoint also exports through `lit-dpo export`
    out = tmp_path / "from-ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "lit_dpo.cli", "export", "--ckpt_path", str(ckpts[-1]),
         "--output_dir", str(out)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    c = load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(c[key], a[key], atol=1e-6, rtol=1e-6, msg=key)

    # bf16 weights, sharded: still ln 2 at step 0 (policy = reference), and it trains
    bf16 = tmp_path / "bf16"
    run("fsdp2_fit.py", tiny_model_dir, pairs_file, bf16, 3, "--bf16-true", cwd=tmp_path)
    bf16_losses = losses(bf16)
    assert bf16_losses[0] == pytest.approx(0.6931472, abs=1e-6) and bf16_losses[2] < 0.69

    # a replicated or a precomputed reference gives the losses of the sharded one
    for option in ("--replicate", "--precomputed"):
        other = tmp_path / option.strip("-")
        run("fsdp2_fit.py", tiny_model_dir, pairs_file, other, 2, option, cwd=tmp_path)
        for step, value in losses(other).items():
            assert value == pytest.approx(straight[step], abs=1e-5), option

    # one process with both ranks' pairs in one batch: the same losses and global grad norms
    import functools

    import lightning as L

    from lit_dpo.data import PreferenceDataModule
    from lit_dpo.module import DPOModule

    norms = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            norms[trainer.global_step - 1] = trainer.callback_metrics["train/grad_norm"].item()

    L.seed_everything(0)
    module = DPOModule(
        tiny_model_dir, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), lr_scheduler=None
    )
    data = PreferenceDataModule(pairs_file, tokenizer=tiny_model_dir, batch_size=4,
                                val_fraction=0.25)  # fmt: skip
    L.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path / "single"), callbacks=[Record()],
    ).fit(module, data)  # fmt: skip
    sharded_norms = losses(full, "grad_norms")
    assert norms.keys() == sharded_norms.keys()
    for step, value in norms.items():
        assert sharded_norms[step] == pytest.approx(value, rel=1e-4), step


def test_ddp_precomputed_reference_each_rank_scores_its_shard(tiny_model_dir, pairs_file, tmp_path):
    """12 train + 4 validation pairs, eval batches of 2: each of 2 ranks scores 3 + 1 batches,
    half of what one process would, and training matches the online reference."""

    def fit(reference):
        out = tmp_path / reference
        out.mkdir()
        run("ddp_fit.py", tiny_model_dir, pairs_file, out, reference, cwd=tmp_path)
        return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    online, cached = fit("copy"), fit("precomputed")
    assert [r["reference_batches"] for r in cached] == [4, 4]
    assert [r["reference_batches"] for r in online] == [0, 0]
    for name, value in online[0]["policy"].items():
        torch.testing.assert_close(cached[0]["policy"][name], value, atol=1e-6, rtol=1e-5)
        assert torch.equal(cached[0]["policy"][name], cached[1]["policy"][name])
    for key in ("train/loss", "val/loss"):
        assert cached[0]["metrics"][key].item() == pytest.approx(
            online[0]["metrics"][key].item(), abs=1e-5
        )
