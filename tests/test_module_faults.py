"""Nothing fails silently: settings a loss would ignore, resuming a checkpoint with another model
or objective, model and tokenizer sources that cannot load, and data that holds no pairs.

Each case is a real run or real files: a fit that saves a checkpoint and a resume that is
refused, `lit-dpo` on a path that does not exist, a DataLoader of pairs that are not pairs.
"""

from __future__ import annotations

import functools
import json
import math
import warnings

import lightning as L
import pytest
import torch
from test_module import trainer as base_trainer
from torch.utils.data import DataLoader

from conftest import build_tokenizer, write_jsonl
from lit_dpo.cli import main
from lit_dpo.data import PreferenceDataModule, collate_pairs
from lit_dpo.hub import load_tokenizer, resolve, weights_fingerprint
from lit_dpo.losses import LOSSES
from lit_dpo.module import DPOModule, identical_pairs
from lit_dpo.reward import implicit_reward

PAIRS = [
    {"prompt": "The movie", "chosen": " was wonderful.", "rejected": " was terrible."},
    {"prompt": "Review the film:", "chosen": " a delight.", "rejected": " boring."},
    {"prompt": "I thought the plot", "chosen": " was great!", "rejected": " was weak."},
    {"prompt": "The acting", "chosen": " was wonderful.", "rejected": " was boring."},
]


def trainer(tmp_path, **kwargs) -> L.Trainer:
    return base_trainer(**{"limit_val_batches": 0, "default_root_dir": tmp_path} | kwargs)


def data(source, tokenizer, **kwargs) -> PreferenceDataModule:
    """An explicit data seed: the default follows PL_GLOBAL_SEED, which earlier tests leave set."""
    settings = dict(val_fraction=0, batch_size=2, seed=0) | kwargs
    return PreferenceDataModule(source, tokenizer, **settings)


def adamw(lr=1e-3):
    return functools.partial(torch.optim.AdamW, lr=lr)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", PAIRS)


# ------------------------------------------------------------------ 1, 2: settings ignored


def test_the_registry_says_which_losses_read_label_smoothing():
    """Each loss run with eps 0 and 0.2 on the same log-probs: it reads label_smoothing exactly
    when its output changes, and that is what its registry entry says."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(8, generator=g) for _ in range(4))
    for name, loss in LOSSES.items():
        plain = loss.fn(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)[0]
        smoothed = loss.fn(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)[0]
        reads = not torch.allclose(plain, smoothed)
        assert reads == bool(loss.smoothing), name
    readers = {name for name, loss in LOSSES.items() if loss.smoothing}
    assert readers == {"sigmoid", "robust", "exo_pair", "sigmoid_norm"}


IGNORING = [name for name, loss in LOSSES.items() if loss.smoothing is False]


@pytest.mark.parametrize("loss_type", [*IGNORING, ["sigmoid", "ipo"], "nll"])
def test_label_smoothing_with_a_loss_that_ignores_it_is_refused(loss_type):
    ignored = loss_type[-1] if isinstance(loss_type, list) else loss_type
    with pytest.raises(ValueError) as raised:
        DPOModule("unused", loss_type=loss_type, label_smoothing=0.1)
    assert str(raised.value) == (
        f"label_smoothing=0.1 is ignored by loss_type {ignored}: only sigmoid, robust, "
        "exo_pair, sigmoid_norm read it; set label_smoothing to 0, or use one of those"
    )


@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "robust", "exo_pair", "sigmoid_norm", ["sigmoid", "nll"]]
)
def test_label_smoothing_with_a_loss_that_reads_it_is_accepted(loss_type, tiny_model_dir):
    """nll has no preference label to smooth: beside sigmoid (cDPO + NLL) it is accepted."""
    DPOModule(tiny_model_dir, loss_type=loss_type, label_smoothing=0.1)
    for name in IGNORING:  # and label_smoothing 0 is accepted with every loss
        DPOModule(tiny_model_dir, loss_type=name, label_smoothing=0.0)


@pytest.mark.parametrize(
    "beta, message",
    [
        (math.inf, "beta must be a finite positive number, got inf"),
        (-math.inf, "beta must be positive, got -inf"),
        (math.nan, "beta must be positive, got nan"),
        (-0.1, "beta must be positive, got -0.1"),
    ],
)
def test_beta_must_be_finite_and_positive(beta, message):
    with pytest.raises(ValueError) as raised:
        DPOModule("unused", beta=beta)
    assert str(raised.value) == message


def test_infinite_beta_from_the_command_line(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(cli_args(tiny_model_dir, pairs_file, tmp_path, "--model.beta", "inf"))
    assert exit_.value.code == "lit-dpo: error: beta must be a finite positive number, got inf"


# ------------------------------------------------------- 3: the implicit reward of strings


def test_implicit_reward_of_strings_is_what_the_module_logs(
    tokenizer, tiny_model_dir, tiny_ref_dir, tmp_path
):
    """String pairs are plain text to PreferenceDataModule even when the tokenizer has a chat
    template; implicit_reward must read them the same way. In float64 so that the 1e-6
    tolerance tests the tokenization, not fp32 summation order."""
    assert tokenizer.chat_template  # the conftest tokenizer has one: the case that differed
    dm = data(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tokenizer)
    dm.prepare_data()
    dm.setup("fit")
    loader = DataLoader(dm.train_dataset, batch_size=len(PAIRS), collate_fn=dm.collate)

    # a reference unlike the policy, so that the rewards are not all 0
    module = DPOModule(tiny_model_dir, ref_model_name_or_path=tiny_ref_dir, beta=0.1)
    module.configure_model()
    module.double()
    (metrics,) = trainer(tmp_path, limit_val_batches=1).validate(module, loader, verbose=False)
    batch = next(iter(loader))
    with torch.no_grad():
        out = module(batch, "val")

    prompts = [r["prompt"] for r in PAIRS]
    chosen = implicit_reward(
        module.policy, module.reference, tokenizer, prompts, [r["chosen"] for r in PAIRS], 0.1
    )
    rejected = implicit_reward(
        module.policy, module.reference, tokenizer, prompts, [r["rejected"] for r in PAIRS], 0.1
    )
    assert chosen.abs().min() > 1e-3  # not vacuous
    close = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=0, check_dtype=False)
    close(out["chosen_rewards"], chosen)
    close(out["rejected_rewards"], rejected)
    close(torch.tensor(metrics["val/rewards/chosen"]), chosen.mean())
    close(torch.tensor(metrics["val/rewards/rejected"]), rejected.mean())


# ------------------------------------------------------------------------------ 4: resuming


@pytest.fixture(scope="module")
def three_layer_dir(tmp_path_factory, tiny_model_dir, tokenizer):
    """The tiny model's config with a third layer, and the same tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 3
    path = tmp_path_factory.mktemp("tiny-llama-3-layers")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def fit_and_save(model_dir, source, tokenizer, path, **kwargs):
    module = DPOModule(model_dir, beta=0.1, optimizer=adamw(), lr_scheduler=None, **kwargs)
    t = trainer(path.parent, max_steps=2)
    t.fit(module, data(source, tokenizer))
    t.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory, tiny_model_dir, pairs_file, tokenizer):
    path = tmp_path_factory.mktemp("full") / "run.ckpt"
    return fit_and_save(tiny_model_dir, pairs_file, tokenizer, path)


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory, tiny_model_dir, pairs_file, tokenizer):
    path = tmp_path_factory.mktemp("lora") / "run.ckpt"
    return fit_and_save(tiny_model_dir, pairs_file, tokenizer, path, lora={"r": 4})


def resume(ckpt, model_dir, source, tokenizer, tmp_path, max_steps=4, **kwargs):
    settings = dict(beta=0.1, optimizer=adamw(), lr_scheduler=None) | kwargs
    module = DPOModule(model_dir, **settings)
    t = trainer(tmp_path, max_steps=max_steps)
    t.fit(module, data(source, tokenizer), ckpt_path=str(ckpt))
    return t, module


def test_the_checkpoint_records_what_it_was_made_from(full_ckpt, tiny_model_dir):
    record = torch.load(full_ckpt, weights_only=True)["lit_dpo"]
    assert json.loads(record["model config"])["num_hidden_layers"] == 2
    assert record["model weights"] == weights_fingerprint(tiny_model_dir)
    assert record["tokenizer"].startswith("320 tokens, vocabulary ")
    assert record["beta"] == 0.1 and record["loss_type"] == ["sigmoid"]
    assert record["reference"] == "copy" and record["lora"] is None


def test_resuming_with_another_architecture_is_refused(
    full_ckpt, three_layer_dir, pairs_file, tokenizer, tmp_path
):
    with pytest.raises(ValueError) as raised:
        resume(full_ckpt, three_layer_dir, pairs_file, tokenizer, tmp_path)
    message = str(raised.value)
    assert message.startswith(
        f"checkpoint {str(full_ckpt)!r} was trained with a model with num_hidden_layers=2, "
        "this run's model has num_hidden_layers=3; with the model weights of "
    )
    assert message.endswith(": resume with the same settings, or start a new run")


def test_resuming_with_another_beta_is_refused(
    full_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path
):
    with pytest.raises(ValueError) as raised:
        resume(full_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path, beta=0.5)
    assert str(raised.value) == (
        f"checkpoint {str(full_ckpt)!r} was trained with beta=0.1, this run has beta=0.5: "
        "resume with the same setting, or start a new run"
    )


@pytest.mark.parametrize(
    "change, named",
    [
        ({"loss_type": "ipo"}, "loss_type=['sigmoid'], this run has loss_type=['ipo']"),
        ({"label_smoothing": 0.1}, "label_smoothing=0.0, this run has label_smoothing=0.1"),
        ({"reference_free": True}, "reference='copy', this run has reference='none'"),
    ],
)
def test_resuming_with_another_objective_is_refused(
    change, named, full_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path
):
    with pytest.raises(ValueError, match="resume with the same setting") as raised:
        resume(full_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path, **change)
    assert named in str(raised.value)


def test_resuming_with_another_reference_model_is_refused(
    full_ckpt, tiny_model_dir, tiny_ref_dir, pairs_file, tokenizer, tmp_path
):
    with pytest.raises(ValueError) as raised:
        resume(
            full_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path,
            ref_model_name_or_path=tiny_ref_dir,
        )  # fmt: skip
    assert (
        "reference='copy', this run has reference='separate'; with reference path None, this "
        f"run has {tiny_ref_dir!r}: resume with the same settings" in str(raised.value)
    )


def test_resuming_with_another_tokenizer_is_refused(
    full_ckpt, tiny_model_dir, pairs_file, tmp_path
):
    other = build_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError) as raised:
        resume(full_ckpt, tiny_model_dir, pairs_file, other, tmp_path)
    assert "(320 tokens, vocabulary " in str(raised.value)
    assert "this run has tokenizer " in str(raised.value)
    assert "(321 tokens, vocabulary " in str(raised.value)


def test_resuming_lora_on_another_base_of_the_same_shape_is_refused(
    lora_ckpt, tiny_model_dir, tiny_ref_dir, pairs_file, tokenizer, tmp_path
):
    with pytest.raises(ValueError) as raised:
        resume(lora_ckpt, tiny_ref_dir, pairs_file, tokenizer, tmp_path, lora={"r": 4})
    assert str(raised.value) == (
        f"checkpoint {str(lora_ckpt)!r} was trained with the model weights of "
        f"{tiny_model_dir!r}, this run's model {tiny_ref_dir!r} has different weight files: "
        "resume with the same setting, or start a new run"
    )


def test_resuming_lora_with_another_lora_config_is_refused(
    lora_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path
):
    with pytest.raises(ValueError) as raised:
        resume(lora_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path, lora={"r": 8})
    assert "lora={'r': 4, 'alpha': 16, 'dropout': 0.0, 'target_modules': 'all-linear'}, this " \
        "run has lora={'r': 8," in str(raised.value)  # fmt: skip


def test_resuming_to_train_longer_with_another_lr_works(
    full_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path
):
    """max_steps, the optimizer's lr and the schedule may change: that extends a run. A copied
    model directory is the same model (its weights are compared, not its path)."""
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copied-model")
    t, _ = resume(full_ckpt, str(copy), pairs_file, tokenizer, tmp_path, optimizer=adamw(1e-4))
    assert t.global_step == 4


def test_a_checkpoint_without_the_record_resumes_with_a_warning(
    full_ckpt, tiny_model_dir, pairs_file, tokenizer, tmp_path
):
    old = torch.load(full_ckpt, weights_only=True)
    del old["lit_dpo"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="does not record the model, tokenizer and settings"):
        t, _ = resume(tmp_path / "old.ckpt", tiny_model_dir, pairs_file, tokenizer, tmp_path)
    assert t.global_step == 4


def test_load_from_checkpoint_still_works(full_ckpt):
    """`lit-dpo export` builds the module from the checkpoint's own settings: nothing differs."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # and no warning about the record
        module = DPOModule.load_from_checkpoint(full_ckpt, weights_only=True)
    assert module.hparams.beta == 0.1


# ----------------------------------------------------------- 5: sources that cannot load


def cli_args(model, dataset, tmp_path, *extra):
    args = ["fit", "--model.model_name_or_path", model, "--data.dataset", dataset]
    args += ["--trainer.accelerator", "cpu", "--trainer.max_steps", "1"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    return [*args, "--data.val_fraction", "0", *extra]


def cli_error(*args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert isinstance(exit_.value.code, str), exit_.value.code
    return exit_.value.code


def test_a_model_path_typo_is_one_line(pairs_file, tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "x")
    message = "no such model directory: './modles/x' (did you mean 'models/x'?)"
    with pytest.raises(FileNotFoundError) as raised:
        resolve("./modles/x")
    assert str(raised.value) == message
    assert cli_error(*cli_args("./modles/x", pairs_file, tmp_path)) == f"lit-dpo: error: {message}"


def test_a_missing_directory_that_looks_like_a_hub_id_while_offline(
    pairs_file, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    message = (
        "cannot download 'models/tiyn' while offline (HF_HUB_OFFLINE=1): pass a local "
        "directory (did you mean 'models/tiny'?)"
    )
    with pytest.raises(ValueError) as raised:
        resolve("models/tiyn")
    assert str(raised.value) == message
    assert cli_error(*cli_args("models/tiyn", pairs_file, tmp_path)) == f"lit-dpo: error: {message}"
    with pytest.raises(ValueError) as raised:
        resolve("org/model")
    assert str(raised.value) == (
        "cannot download 'org/model' while offline (HF_HUB_OFFLINE=1): pass a local directory"
    )


@pytest.fixture
def model_without_tokenizer(tmp_path, tiny_model_dir):
    import shutil

    path = shutil.copytree(tiny_model_dir, tmp_path / "no-tokenizer")
    for file in path.iterdir():
        if "token" in file.name or file.name == "chat_template.jinja":
            file.unlink()
    return str(path)


def test_a_model_directory_without_tokenizer_files(model_without_tokenizer, pairs_file, tmp_path):
    message = (
        f"{model_without_tokenizer!r} has no tokenizer files (tokenizer.json, "
        "tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt, spiece.model): pass the "
        "tokenizer's directory or hub id as data.tokenizer"
    )
    with pytest.raises(FileNotFoundError) as raised:
        load_tokenizer(model_without_tokenizer)
    assert str(raised.value) == message
    assert cli_error(*cli_args(model_without_tokenizer, pairs_file, tmp_path)) == (
        f"lit-dpo: error: {message}"
    )


def test_a_directory_without_a_model_config(tiny_model_dir, pairs_file, tmp_path):
    import shutil

    path = shutil.copytree(tiny_model_dir, tmp_path / "no-config")
    (path / "config.json").unlink()
    message = (
        f"{str(path)!r} is not a model directory: it has no config.json (a Hugging Face model "
        "directory, as save_pretrained or lit-dpo export writes, has one)"
    )
    with pytest.raises(FileNotFoundError) as raised:
        DPOModule(str(path)).configure_model()
    assert str(raised.value) == message
    assert cli_error(*cli_args(str(path), pairs_file, tmp_path)) == f"lit-dpo: error: {message}"


def test_the_weights_fingerprint_tells_same_shape_models_apart(
    tiny_model_dir, tiny_ref_dir, tmp_path
):
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")  # new mtimes, same weights
    assert weights_fingerprint(str(copy)) == weights_fingerprint(tiny_model_dir)
    assert weights_fingerprint(tiny_ref_dir) != weights_fingerprint(tiny_model_dir)


# -------------------------------------------------------------------------- 6: no pairs

KTO = [
    {"prompt": "The movie", "completion": " was wonderful.", "label": True},
    {"prompt": "Review the film:", "completion": " boring.", "label": False},
    {"prompt": "I thought the plot", "completion": " was great!", "label": True},
    {"prompt": "The acting", "completion": " was weak.", "label": False},
]


def identical(tokenizer):
    """Tokenized rows whose chosen and rejected completions are the same, and their batch."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [
        {
            "prompt_input_ids": tokenizer(r["prompt"])["input_ids"],
            "chosen_input_ids": ids(r["completion"]) + [tokenizer.eos_token_id],
            "rejected_input_ids": ids(r["completion"]) + [tokenizer.eos_token_id],
        }
        for r in KTO
    ]
    return rows, collate_pairs(rows, tokenizer.pad_token_id)


def test_identical_pairs_padded_and_packed(tokenizer):
    rows, _ = identical(tokenizer)
    one_real_pair = [rows[0] | {"rejected_input_ids": [7, tokenizer.eos_token_id]}, *rows[1:]]
    for packing in (False, True):
        assert identical_pairs(collate_pairs(rows, tokenizer.pad_token_id, packing=packing))
        batch = collate_pairs(one_real_pair, tokenizer.pad_token_id, packing=packing)
        assert not identical_pairs(batch)


def test_a_dataloader_of_identical_pairs_is_refused_at_the_first_step(
    tokenizer, tiny_model_dir, tmp_path
):
    _, batch = identical(tokenizer)
    module = DPOModule(tiny_model_dir, optimizer=adamw(), lr_scheduler=None)
    t = trainer(tmp_path, max_steps=3)
    with pytest.raises(ValueError) as raised:
        t.fit(module, DataLoader([batch, batch, batch], batch_size=None))
    assert str(raised.value) == (
        "every pair of the first training batch has identical chosen and rejected completions: "
        "DPO needs preference pairs (prompt/chosen/rejected) that differ; for unpaired "
        "prompt/completion rows (KTO-style or SFT data) train SFTModule instead"
    )
    assert t.global_step == 0


def test_unpaired_rows_from_the_datamodule_are_refused_before_any_step(
    tokenizer, tiny_model_dir, tmp_path
):
    """The data module knows the split's format: refused at setup, naming the file, not by the
    batch check."""
    source = write_jsonl(tmp_path / "kto.jsonl", KTO)
    module = DPOModule(tiny_model_dir, optimizer=adamw(), lr_scheduler=None)
    t = trainer(tmp_path, max_steps=3)
    with pytest.raises(ValueError) as raised:
        t.fit(module, data(source, tokenizer))
    message = str(raised.value)
    assert message.startswith(f"{source}: split 'train': ") and "SFTModule" in message
    assert module.policy is None  # before configure_model: nothing was loaded
