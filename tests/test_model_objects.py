"""Models users already hold: a PreTrainedModel or a PeftModel goes into DPOModule / SFTModule
as it is (trained in place, copied once for the reference, nothing loaded), stays out of
hparams, checkpoints resume exactly; `revision` reaches from_pretrained and the checkpoint
record; the lr is logged every step."""

import copy
import functools
import math
import warnings

import datasets
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from test_module import trainer as base_trainer
from torch import nn

from conftest import build_model
from lit_dpo.data import PreferenceDataModule
from lit_dpo.module import DPOModule, PaperRMSprop
from lit_dpo.sft import SFTModule

OBJECT = object()  # stands for a model object in parameters (built in the test)
LN2 = torch.tensor(math.log(2)).item()  # the fp32 loss of a policy equal to its reference

ROWS = {
    "prompt": [f"Review film {i}:" for i in range(8)],
    "chosen": [" a delight.", " wonderful.", " great music!", " loved", " warm", " bright",
               " tender", " a delight!"],
    "rejected": [" boring.", " terrible.", " weak.", " I wanted to leave.", " dull", " slow",
                 " clumsy", " meh"],
}  # fmt: skip


def data(tokenizer, batch_size=4):
    """8 in-memory pairs and a tokenizer object: no path anywhere."""
    split = datasets.Dataset.from_dict(ROWS)
    splits = datasets.DatasetDict({"train": split, "validation": split})
    return PreferenceDataModule(splits, tokenizer=tokenizer, batch_size=batch_size)


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


class Recorder(Logger):
    """A logger that keeps every row of metrics it is given."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))


def trainer(tmp_path, steps=3, **kwargs):
    settings = dict(max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0)
    return base_trainer(**(settings | {"default_root_dir": str(tmp_path)} | kwargs))


def adamw(lr=1e-2):
    return functools.partial(torch.optim.AdamW, lr=lr)


def lora_model(vocab, seed=0):
    from peft import LoraConfig, get_peft_model

    model = build_model(vocab, seed=seed)
    torch.manual_seed(seed)  # the adapters' initial weights
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, config)


@pytest.fixture
def nothing_loaded_and_one_copy(monkeypatch):
    """from_pretrained refuses to run; returns the classes of the models deep-copied (top-level
    `copy.deepcopy` calls on a module; its submodules are copied through the same function)."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError(f"from_pretrained{args} was called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    copies, deepcopy = [], copy.deepcopy

    def counting(x, memo=None, _nil=[]):  # noqa: B006 (copy.deepcopy's own signature)
        if memo is None and isinstance(x, nn.Module):
            copies.append(type(x).__name__)
        return deepcopy(x, memo, _nil)

    monkeypatch.setattr(copy, "deepcopy", counting)
    return copies


def states(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]


# -------------------------------------------------------------------- a PreTrainedModel object


def test_a_model_object_trains_in_place_against_one_frozen_copy(
    tokenizer, tmp_path, nothing_loaded_and_one_copy
):
    model = build_model(len(tokenizer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "is an instance of nn.Module" from Lightning
        module = DPOModule(model, beta=0.1, optimizer=adamw(), lr_scheduler=None)
    assert module.hparams.model_name_or_path == "<LlamaForCausalLM object>"
    assert not any(isinstance(v, nn.Module) for v in module.hparams.values())
    assert not any(isinstance(v, nn.Module) for v in module.hparams_initial.values())
    initial = states(model)

    losses = Losses()
    trainer(tmp_path, callbacks=[losses]).fit(module, data(tokenizer))

    assert nothing_loaded_and_one_copy == ["LlamaForCausalLM"]  # the reference, once
    assert module.policy is model and module.reference is not model
    assert losses.losses[0] == LN2  # bitwise: the reference is the policy's initial weights
    assert losses.losses[-1] < losses.losses[0]
    assert changed(initial, model)
    assert not changed(initial, module.reference)
    assert not any(p.requires_grad for p in module.reference.parameters())
    record = module.run_record()
    assert record["model weights"].startswith("memory:")
    assert record["sources"]["model"] == "<LlamaForCausalLM object>"


def test_a_reference_object_is_frozen_in_place_not_copied(tokenizer, nothing_loaded_and_one_copy):
    model, ref = build_model(len(tokenizer), seed=0), build_model(len(tokenizer), seed=1)
    module = DPOModule(model, ref_model_name_or_path=ref)
    module.configure_model()
    assert nothing_loaded_and_one_copy == []
    assert module.reference_mode == "separate" and module.reference is ref
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert module.hparams.ref_model_name_or_path == "<LlamaForCausalLM object>"
    assert module.run_record()["reference weights"].startswith("memory:")


# ------------------------------------------------------------------------- a PeftModel object


def test_a_peft_model_trains_its_adapters_with_the_adapter_reference_or_a_copy(
    tokenizer, tmp_path, nothing_loaded_and_one_copy
):
    """Fresh adapters (B = 0): the adapter reference (adapters off) and the default copy are the
    same initial policy, so both runs give the same losses, from ln 2."""
    runs = {}
    for reference in ("adapter", None):
        model = lora_model(len(tokenizer))
        initial = states(model)
        module = DPOModule(model, reference=reference, optimizer=adamw(), lr_scheduler=None)
        losses = Losses()
        L.seed_everything(0)
        trainer(tmp_path, callbacks=[losses]).fit(module, data(tokenizer))
        runs[module.reference_mode] = losses.losses
        assert module.policy is model and losses.losses[0] == LN2
        moved = changed(initial, model)
        assert moved and all("lora_" in k for k in moved)  # the base stays frozen
        if module.reference is not None:
            assert not changed(initial, module.reference)
    assert module.hparams.model_name_or_path == "<PeftModel object>"
    assert nothing_loaded_and_one_copy == ["PeftModel"]  # only the copy run copies
    assert runs["adapter"] == pytest.approx(runs["copy"], abs=1e-6)


def test_lora_on_a_model_object_keeps_only_the_adapters_in_checkpoints(tokenizer, tmp_path):
    """`lora` wraps the object (in place) and the reference is the adapters switched off; the
    frozen base is rebuilt from the object given again."""
    module = DPOModule(build_model(len(tokenizer)), lora={"r": 4}, optimizer=adamw())
    losses = Losses()
    t = trainer(tmp_path, steps=2, callbacks=[losses])
    t.fit(module, data(tokenizer))
    assert module.reference_mode == "adapter" and losses.losses[0] == LN2
    t.save_checkpoint(tmp_path / "lora.ckpt")
    state = torch.load(tmp_path / "lora.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)
    loaded = DPOModule.load_from_checkpoint(
        tmp_path / "lora.ckpt", weights_only=True, model_name_or_path=build_model(len(tokenizer))
    )
    for k, v in module.policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[k], v), k


# -------------------------------------------------------------------------------- SFTModule


def test_sft_trains_a_model_object_in_place(tokenizer, tmp_path, nothing_loaded_and_one_copy):
    model = build_model(len(tokenizer))
    initial = states(model)
    module = SFTModule(model, optimizer=adamw(), lr_scheduler=None)
    losses = Losses()
    trainer(tmp_path, steps=6, callbacks=[losses]).fit(module, data(tokenizer))
    assert module.policy is model and changed(initial, model)
    # 8 pairs in batches of 4: steps 1-2 and 5-6 are epochs 1 and 3, over the same rows.
    assert sum(losses.losses[-2:]) < sum(losses.losses[:2])
    assert nothing_loaded_and_one_copy == []


# ---------------------------------------------------------------------------------- resuming


def fit(model, tokenizer, root, steps, ckpt_path=None, save_at=None):
    """DPO on 4 batches of 2 pairs an epoch; `save_at`: a checkpoint after that step."""
    module = DPOModule(model, beta=0.1, optimizer=adamw(), lr_scheduler=None)
    callbacks = [ModelCheckpoint(root, every_n_train_steps=save_at)] if save_at else []
    t = trainer(root, steps=steps, callbacks=callbacks, enable_checkpointing=bool(save_at))
    L.seed_everything(0)  # the same data order in every run
    t.fit(module, data(tokenizer, batch_size=2), ckpt_path=ckpt_path)
    return t, module


def test_a_checkpoint_of_a_model_object_resumes_exactly_given_the_object_again(tokenizer, tmp_path):
    """Saved mid-epoch at step 2, resumed with a fresh object of the same weights to step 6
    (into the second epoch): the weights of 6 uninterrupted steps, bitwise."""
    vocab = len(tokenizer)
    _, straight = fit(build_model(vocab), tokenizer, tmp_path / "a", steps=6)

    _, first = fit(build_model(vocab), tokenizer, tmp_path / "b", steps=2, save_at=2)
    (ckpt,) = (tmp_path / "b").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("reference.") for k in saved["state_dict"])  # rebuilt
    assert saved["hyper_parameters"]["model_name_or_path"] == "<LlamaForCausalLM object>"

    _, resumed = fit(build_model(vocab), tokenizer, tmp_path / "c", steps=6, ckpt_path=ckpt)
    for k, v in straight.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[k], v), k

    # The first run's object trained in place: it no longer holds the initial weights.
    with pytest.raises(ValueError, match="holds other weights .a model object trains in place"):
        fit(first.policy, tokenizer, tmp_path / "d", steps=4, ckpt_path=ckpt)

    with pytest.raises(ValueError) as raised:
        DPOModule.load_from_checkpoint(ckpt, weights_only=True)
    assert str(raised.value) == (
        "model_name_or_path=<LlamaForCausalLM object> was a model object, which a checkpoint "
        "does not hold: pass the model again, e.g. "
        "DPOModule.load_from_checkpoint(path, model_name_or_path=model)"
    )
    loaded = DPOModule.load_from_checkpoint(
        ckpt, weights_only=True, model_name_or_path=build_model(vocab)
    )
    for k, v in first.policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[k], v), k


def test_resuming_a_path_run_with_an_object_says_to_give_it_the_same_way(
    tokenizer, tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    module = DPOModule(tiny_model_dir, beta=0.1, optimizer=adamw(), lr_scheduler=None)
    t = trainer(tmp_path, steps=1)
    t.fit(module, data(tokenizer))
    t.save_checkpoint(tmp_path / "path.ckpt")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError) as raised:
        fit(model, tokenizer, tmp_path, steps=2, ckpt_path=tmp_path / "path.ckpt")
    assert (
        f"with model {tiny_model_dir!r}, this run's model is "
        f"\"<LlamaForCausalLM object from '{tiny_model_dir}'>\" (an object's weights are "
        "compared in memory, a path's by its files: give it the same way)"
    ) in str(raised.value)


# ------------------------------------------------------------------ what cannot go together


def test_assigning_a_policy_is_refused_configure_model_still_sets_it(tokenizer):
    model = build_model(len(tokenizer))
    module = DPOModule(build_model(len(tokenizer)))
    with pytest.raises(AttributeError) as raised:
        module.policy = model
    assert str(raised.value) == (
        "pass the model to DPOModule(model) instead: assigning .policy builds no reference"
    )
    module.configure_model()
    assert module.policy is not None and module.reference is not None
    with pytest.raises(AttributeError, match="assigning .policy builds no reference"):
        module.policy = model  # afterwards too: the reference would be another model's
    sft = SFTModule("any/model")
    with pytest.raises(AttributeError) as raised:
        sft.policy = model
    assert str(raised.value) == (
        "pass the model to SFTModule(model) instead: assigning .policy skips configure_model "
        "(dropout off, LoRA, sharding)"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"revision": "v1"},
            "revision='v1' picks the version of a hub model to load, but model_name_or_path is "
            "<LlamaForCausalLM object>, already built: unset revision",
        ),
        (
            {"torch_dtype": "bfloat16"},
            "torch_dtype='bfloat16', but model_name_or_path is <LlamaForCausalLM object>, "
            "already built in torch.float32: cast it (model.to(torch.bfloat16)) or unset "
            "torch_dtype",
        ),
        (
            {"ref_model_name_or_path": OBJECT, "ref_revision": "v1"},
            "ref_revision='v1' picks the version of a hub reference to load, but "
            "ref_model_name_or_path is <LlamaForCausalLM object>: unset ref_revision",
        ),
        (
            {"ref_revision": "v1"},
            "ref_revision='v1' picks the version of a hub reference to load, but "
            "ref_model_name_or_path is None: unset ref_revision",
        ),
        (
            {"reference": "copy", "ref_model_name_or_path": OBJECT},
            "reference='copy' and ref_model_name_or_path=<LlamaForCausalLM object>: a separate "
            "reference needs the path; copy and adapter take none",
        ),
        (
            {"reference": "adapter"},
            "reference='adapter' needs lora (or a PeftModel policy): the reference is the "
            "policy with its adapters disabled",
        ),
    ],
)
def test_settings_that_cannot_apply_to_a_model_object_are_refused(kwargs, message):
    kwargs = {k: build_model(320) if v is OBJECT else v for k, v in kwargs.items()}
    with pytest.raises(ValueError) as raised:
        DPOModule(build_model(320), **kwargs)
    assert str(raised.value) == message


def test_lora_on_a_peft_model_and_other_values_are_refused():
    with pytest.raises(ValueError, match="lora adds adapters, but model_name_or_path is <Peft"):
        DPOModule(lora_model(320), lora={"r": 4})
    with pytest.raises(TypeError) as raised:
        SFTModule(3)
    assert str(raised.value) == (
        "model_name_or_path must be a hub id, a path or a model object (PreTrainedModel, "
        "PeftModel), got a int"
    )


# ---------------------------------------------------------------------------------- revision


def test_revision_reaches_from_pretrained_and_the_checkpoint_record(
    monkeypatch, tokenizer, tiny_model_dir
):
    """The Hub is unreachable: from_pretrained is replaced by one that records its arguments."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_dpo.hub import load_tokenizer

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    calls = []

    def from_pretrained(source, **kwargs):
        calls.append((source, kwargs.get("revision")))
        return build_model(len(tokenizer), seed=len(calls))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    module = DPOModule(
        "org/policy", revision="v1.0", ref_model_name_or_path="org/ref", ref_revision="abc123"
    )
    module.configure_model()
    assert calls == [("org/policy", "v1.0"), ("org/ref", "abc123")]
    assert module.hparams.revision == "v1.0" and module.hparams.ref_revision == "abc123"
    record = module.run_record()
    assert record["model revision"] == "v1.0" and record["reference revision"] == "abc123"
    assert record["model weights"] == "hub:org/policy@v1.0"

    other = DPOModule(
        "org/policy", revision="v2.0", ref_model_name_or_path="org/ref", ref_revision="abc123"
    )
    other.configure_model()
    with pytest.raises(ValueError, match="model revision='v1.0', this run has model revision="):
        other.on_load_checkpoint({"lit_dpo": record})

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda s, **kw: (s, kw["revision"]))
    assert load_tokenizer("org/policy", revision="v1.0") == ("org/policy", "v1.0")
    with pytest.raises(ValueError) as raised:
        DPOModule(tiny_model_dir, revision="v1.0").configure_model()
    assert str(raised.value) == (
        f"revision='v1.0' picks a version of a hub model, but {tiny_model_dir!r} is a local "
        "model: unset revision, or give the hub id"
    )


# ---------------------------------------------------------------------------------- the lr


def test_the_lr_is_logged_every_step_the_warmup_exactly(tokenizer, tmp_path):
    """The default schedule is the paper's linear warmup over 150 steps: step k (from 1) runs at
    lr * k / 150, as LambdaLR computes it."""
    recorder = Recorder()
    module = DPOModule(
        build_model(len(tokenizer)), optimizer=functools.partial(PaperRMSprop, lr=5e-6)
    )
    trainer(tmp_path, logger=recorder, log_every_n_steps=1).fit(module, data(tokenizer))
    lrs = [row["train/lr"] for row in recorder.rows if "train/lr" in row]
    assert lrs == [5e-6 * (k / 150) for k in (1, 2, 3)]
