"""What `lit-dpo` shows: its subcommands, a quiet run with a progress bar in steps, the tokenizer
option, the configs' first lines, and SampleReplies (the policy's replies at each validation)."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger

from conftest import write_jsonl
from lit_dpo.callbacks import ParamSummary, StepProgressBar, short_names
from lit_dpo.cli import DPOCLI, main
from lit_dpo.data import PreferenceDataModule
from lit_dpo.module import DPOModule
from lit_dpo.samples import SampleReplies, sample_replies

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
ENV |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "80", "LINES": "24"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """12 train pairs; 4 validation pairs over 3 distinct prompts (A, A, B, C)."""
    root = tmp_path_factory.mktemp("pairs")
    pair = {"chosen": " a delight.", "rejected": " boring."}
    write_jsonl(root / "train.jsonl", [{"prompt": f"Review film {i}:", **pair} for i in range(12)])
    val = [{"prompt": f"Review film {c}:", **pair} for c in "AABC"]
    write_jsonl(root / "validation.jsonl", val)
    return str(root)


# -- the command -------------------------------------------------------------------------------


def test_help_lists_every_subcommand_and_predict_is_gone(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listed = re.search(r"\{([\w,]+)\}", capsys.readouterr().out)[1].split(",")
    assert listed == ["fit", "validate", "test", "export"]
    with pytest.raises(SystemExit) as exit_:
        main(["predict"])
    assert exit_.value.code == 2
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def cli(*args: str) -> DPOCLI:
    """The CLI's classes as `lit-dpo fit` would build them, without running anything."""
    return DPOCLI(
        DPOModule,
        PreferenceDataModule,
        args=["--config", TINY, "--trainer.default_root_dir", "unused", *args],
        run=False,
        auto_configure_optimizers=False,
    )


def test_the_tokenizer_follows_the_model_unless_given(
    tiny_model_dir, data_dir, tmp_path, tokenizer
):
    base = ["--model.model_name_or_path", tiny_model_dir, "--data.dataset", data_dir]
    assert cli(*base).datamodule.tokenizer == tiny_model_dir
    other = tmp_path / "other-tokenizer"
    tokenizer.save_pretrained(other)
    assert cli(*base, "--data.tokenizer", str(other)).datamodule.tokenizer == str(other)


def test_our_bar_and_summary_unless_the_config_names_its_own(tiny_model_dir, data_dir):
    base = ["--model.model_name_or_path", tiny_model_dir, "--data.dataset", data_dir]
    kinds = {
        type(c) for c in cli(*base, "--trainer.enable_model_summary", "true").trainer.callbacks
    }
    assert {StepProgressBar, ParamSummary} <= kinds
    assert ParamSummary not in {type(c) for c in cli(*base).trainer.callbacks}  # tiny.yaml: off
    rich = cli(*base, "--trainer.callbacks+=RichProgressBar").trainer.callbacks
    assert [type(c) for c in rich if "ProgressBar" in type(c).__name__] == [RichProgressBar]
    off = cli(*base, "--trainer.enable_progress_bar", "false").trainer.callbacks
    assert StepProgressBar not in {type(c) for c in off}


@pytest.mark.parametrize("config", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_says_in_its_first_line_what_it_needs(config):
    first = config.read_text().splitlines()[0]
    assert first.startswith(("# Needs ", "# Runs as shipped")), first


def test_a_normal_run_is_quiet_and_counts_steps(tiny_model_dir, data_dir, tmp_path):
    """No Python warning and no library tip in a plain run; the bar reads `step N/4` in 80
    columns, with the metrics under short names; each validation leaves one line."""
    args = ["fit", "--config", TINY, "--model.model_name_or_path", tiny_model_dir]
    args += ["--data.dataset", data_dir, "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.enable_model_summary", "true"]
    run = subprocess.run(
        [sys.executable, "-m", "lit_dpo.cli", *args],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    err = run.stderr
    for noise in ["Warning:", "warnings.warn", "💡", "FLOPs", "eval mode", "deprecated"]:
        assert noise not in err, err
    assert not re.search(r"\.py:\d+: ", err), err  # Lightning prints its warnings as path:line:
    assert "GPU available" in err and "trainable" in err  # Lightning's device lines, our summary
    screen = [line for line in re.split(r"[\r\n]", run.stdout) if line.strip()]
    bar = [line for line in screen if line.startswith("step ") and "|" in line]
    assert all(len(line.rstrip()) <= 80 for line in bar), max(bar, key=len)
    assert bar[-1].startswith("step 4/4 |"), bar[-1]
    assert "loss=" in bar[-1] and "acc=" in bar[-1] and "margin=" in bar[-1]
    assert "Epoch" not in run.stdout and "train/" not in run.stdout
    assert [line.split(":")[0] for line in screen if ": val loss" in line] == ["step 2", "step 4"]


def test_short_names_keep_apart_what_they_cannot_shorten():
    metrics = {"train/rewards/margins": 1, "train/loss": 2, "train/nll/loss": 3, "lr": 4}
    assert short_names(metrics) == {"train/loss": 2, "train/nll/loss": 3, "margin": 1, "lr": 4}


# -- SampleReplies -------------------------------------------------------------------------------


def fit(model_dir, data_dir, root, callback, logger=None, steps=2, **module):
    L.seed_everything(0)
    dpo = DPOModule(model_dir, lr_scheduler=None, **module)
    data = PreferenceDataModule(data_dir, tokenizer=model_dir, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, val_check_interval=1, num_sanity_val_steps=1,
        logger=logger if logger is not None else CSVLogger(root), callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(dpo, data)
    return trainer, dpo


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_of_each_validation_go_to_the_csv_run(tiny_model_dir, data_dir, tmp_path):
    callback = SampleReplies(n_prompts=2, n_samples=2, max_new_tokens=4)
    trainer, _ = fit(tiny_model_dir, data_dir, tmp_path, callback)
    log_dir = Path(trainer.log_dir)
    assert sorted(p.name for p in log_dir.glob("samples-*")) == [
        "samples-step1.jsonl",
        "samples-step2.jsonl",
    ]  # one per validation, none for the sanity check
    for step in (1, 2):
        rows = read_rows(log_dir / f"samples-step{step}.jsonl")
        assert [(r["step"], r["prompt"], r["model"]) for r in rows] == [
            (step, prompt, model)
            for model in ("policy", "reference")
            for prompt in ("Review film A:", "Review film A:", "Review film B:", "Review film B:")
        ]  # the first 2 distinct validation prompts, 2 samples each, per model
        assert all(1 <= r["tokens"] <= 4 and math.isfinite(r["reward"]) for r in rows)
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"samples/policy_reward", "samples/reference_reward", "samples/seconds"} <= set(header)


def full_logp(model, prompt_ids, completion_ids):
    """Independent of lit_dpo: one unpadded forward, full logits, sum over the completion."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(prompt_ids) - 1 :].sum().item()


def test_a_reply_s_reward_is_beta_times_its_log_ratio(tiny_model_dir, tiny_ref_dir, tokenizer):
    from lit_dpo.generation import Sampling, generate_ids

    dpo = DPOModule(tiny_model_dir, ref_model_name_or_path=tiny_ref_dir, beta=0.5)
    dpo.configure_model()
    prompt_ids = [tokenizer("Review film A:")["input_ids"], tokenizer("A robot")["input_ids"]]
    sampling = Sampling(2, 5, 1.0, 1.0, seed=3)
    rows = sample_replies(dpo, tokenizer, prompt_ids, sampling)
    assert [(r["model"], r["prompt"]) for r in rows] == [
        (m, p) for m in ("policy", "reference") for p in (0, 0, 1, 1)
    ]
    for model, name in [(dpo.policy, "policy"), (dpo.reference, "reference")]:
        prompts, replies = generate_ids(model, tokenizer, prompt_ids, sampling)
        got = [r["reward"] for r in rows if r["model"] == name]
        expected = [
            0.5 * (full_logp(dpo.policy, p, c) - full_logp(dpo.reference, p, c))
            for p, c in zip(prompts, replies, strict=True)
        ]
        assert got == pytest.approx(expected, abs=1e-5)
        assert [r["tokens"] for r in rows if r["model"] == name] == list(map(len, replies))


@pytest.mark.parametrize(
    "module, models, rewarded",
    [
        ({"lora": {"r": 4}, "reference": "adapter"}, ["policy", "reference"], True),
        ({"reference_free": True}, ["policy"], True),
        ({"reference": "precomputed"}, ["policy"], False),
    ],
    ids=["adapter", "reference-free", "precomputed"],
)
def test_samples_with_each_kind_of_reference(
    module, models, rewarded, tiny_model_dir, data_dir, tmp_path
):
    if module.get("reference") == "precomputed":
        module["reference_cache_dir"] = str(tmp_path / "cache")
    callback = SampleReplies(n_prompts=1, max_new_tokens=3)
    trainer, dpo = fit(tiny_model_dir, data_dir, tmp_path, callback, steps=1, **module)
    rows = read_rows(Path(trainer.log_dir) / "samples-step1.jsonl")
    assert [r["model"] for r in rows] == models
    assert all((r["reward"] is not None) == rewarded for r in rows)
    if "lora" in module:  # the adapters are back on after sampling the reference
        from peft.tuners.tuners_utils import BaseTunerLayer

        lora = [m for m in dpo.policy.modules() if isinstance(m, BaseTunerLayer)]
        assert lora and not any(m.disable_adapters for m in lora)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="needs the tensorboard package"
)
def test_samples_of_each_validation_go_to_tensorboard(tiny_model_dir, data_dir, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing import event_accumulator

    callback = SampleReplies(n_prompts=2, max_new_tokens=4)
    trainer, _ = fit(tiny_model_dir, data_dir, tmp_path, callback, TensorBoardLogger(tmp_path))
    events = event_accumulator.EventAccumulator(trainer.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("samples/text_summary")
    assert [e.step for e in texts] == [1, 2]
    for event in texts:
        table = event.tensor_proto.string_val[0].decode()
        assert table.startswith("| prompt | model | reply | reward |")
        assert table.count("| Review film A: | policy |") == 1
        assert table.count("| Review film B: | reference |") == 1
    assert [e.step for e in events.Scalars("samples/policy_reward")] == [1, 2]


def test_validate_samples_a_checkpoint_s_replies_to_a_prompts_file(
    tiny_model_dir, data_dir, tmp_path, tokenizer
):
    """`lit-dpo validate --ckpt_path ... --trainer.callbacks+=SampleReplies`: the replies of a
    trained policy to prompts of one's own (what a `predict` would have been); and a run whose
    tokenizer is given apart from the model (`--data.tokenizer DIR`)."""
    other = tmp_path / "other-tokenizer"
    tokenizer.save_pretrained(other)
    base = ["--config", TINY, "--model.model_name_or_path", tiny_model_dir, "--data.dataset"]
    base += [data_dir, "--data.tokenizer", str(other), "--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *base, "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    (ckpt,) = (tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write a review of a film about space.\n\nWhat did you think of it?\n")
    main([
        "validate", *base, "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=lit_dpo.samples.SampleReplies",
        "--trainer.callbacks.prompts", str(prompts), "--trainer.callbacks.max_new_tokens", "4",
    ])  # fmt: skip
    rows = read_rows(tmp_path / "lightning_logs" / "version_1" / "samples-step2.jsonl")
    assert [(r["prompt"], r["model"]) for r in rows] == [
        ("Write a review of a film about space.", "policy"),
        ("What did you think of it?", "policy"),
        ("Write a review of a film about space.", "reference"),
        ("What did you think of it?", "reference"),
    ]


def test_a_missing_prompts_file_is_one_line_before_the_run(tiny_model_dir, data_dir, tmp_path):
    args = ["fit", "--config", TINY, "--model.model_name_or_path", tiny_model_dir]
    args += ["--data.dataset", data_dir, "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.callbacks+=lit_dpo.samples.SampleReplies"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--trainer.callbacks.prompts", str(tmp_path / "nope.txt")])
    assert (
        exit_.value.code
        == f"lit-dpo: error: SampleReplies: prompts file {tmp_path}/nope.txt not found"
    )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_tokenizer_follows_the_models_revision(monkeypatch):
    """`--model.revision v1` loads the model's tokenizer at v1 too (the data module's own
    `revision` is the dataset's); a tokenizer named on its own keeps its own revision."""
    from lit_dpo.cli import DPOCLI
    from lit_dpo.data import PreferenceDataModule
    from lit_dpo.module import DPOModule

    def parse(*args):
        cli = DPOCLI(
            DPOModule,
            PreferenceDataModule,
            args=["--model.model_name_or_path", "org/model", "--data.dataset", "d.jsonl", *args],
            run=False,
            auto_configure_optimizers=False,
        )
        return cli.datamodule.hparams

    hp = parse("--model.revision", "v1")
    assert (hp.tokenizer, hp.tokenizer_revision) == ("org/model", "v1")
    hp = parse("--model.revision", "v1", "--data.tokenizer", "org/tok")
    assert (hp.tokenizer, hp.tokenizer_revision) == ("org/tok", None)

    loaded = []
    monkeypatch.setattr(  # the Hub is unreachable here: record what would be loaded
        "lit_dpo.data.module.load_tokenizer", lambda *a: loaded.append(a) or 1 / 0
    )
    dm = PreferenceDataModule("d.jsonl", tokenizer="org/tok", tokenizer_revision="v2")
    with pytest.raises(ZeroDivisionError):
        dm._load_tokenizer()
    assert loaded == [("org/tok", False, "v2")]
