"""Reference strategies, LoRA, precision and accumulation: each lever gives the losses of the
plain online run it replaces."""

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import write_jsonl
from lit_dpo.data import PreferenceDataModule
from lit_dpo.module import DPOModule, LoRA

WORDS = "the film was a delight boring slow warm bright dull tender clumsy".split()


@pytest.fixture
def pairs_file(tmp_path):
    """24 pairs of varied prompt and completion lengths."""
    g = torch.Generator().manual_seed(0)

    def text(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g))

    rows = [
        {"prompt": f"Review {i}: {text(1, 8)}", "chosen": f" {text(1, 9)}", "rejected": " meh"}
        for i in range(24)
    ]
    return str(write_jsonl(tmp_path / "pairs.jsonl", rows))


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def fit(model_dir, data_file, tmp_path, steps=3, data_kwargs=None, trainer_kwargs=None, **kw):
    """Train `steps` steps (AdamW lr 1e-2, no warmup); return (per-step losses, module, trainer)."""
    L.seed_everything(0)
    module = DPOModule(
        model_dir,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        lr_scheduler=None,
        reference_cache_dir=str(tmp_path / "ref-cache"),
        **kw,
    )
    data = PreferenceDataModule(
        data_file, tokenizer=model_dir, batch_size=4, val_fraction=0.25, **(data_kwargs or {})
    )
    losses = Losses()
    trainer = L.Trainer(
        **{
            "accelerator": "cpu",
            "max_steps": steps,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [losses],
        }
        | (trainer_kwargs or {})
    )
    trainer.fit(module, data)
    return losses.losses, module, trainer


def assert_losses_equal(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=tol, rel=tol)


def test_precomputed_reference_gives_the_online_losses(
    tiny_model_dir, tiny_ref_dir, pairs_file, tmp_path
):
    online, *_ = fit(tiny_model_dir, pairs_file, tmp_path)
    assert online[0] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy = reference
    cached, module, _ = fit(tiny_model_dir, pairs_file, tmp_path, reference="precomputed")
    assert module.reference is None  # no reference model kept in memory
    assert_losses_equal(cached, online)
    assert online[-1] < online[0]  # it trains: the comparison is not between constants

    separate, *_ = fit(tiny_model_dir, pairs_file, tmp_path, ref_model_name_or_path=tiny_ref_dir)
    assert abs(separate[0] - math.log(2)) > 1e-3  # a different reference: Delta != 0
    cached_sep, *_ = fit(
        tiny_model_dir, pairs_file, tmp_path, ref_model_name_or_path=tiny_ref_dir,
        reference="precomputed",
    )  # fmt: skip
    assert_losses_equal(cached_sep, separate)


def test_reference_cache_is_reused_rebuilt_when_stale_or_corrupt(
    tiny_model_dir, pairs_file, tmp_path, caplog
):
    want, *_ = fit(tiny_model_dir, pairs_file, tmp_path, steps=2, reference="precomputed")
    (path,) = (tmp_path / "ref-cache").glob("*.safetensors")
    stamp = path.stat().st_mtime_ns
    again, *_ = fit(tiny_model_dir, pairs_file, tmp_path, steps=2, reference="precomputed")
    assert path.stat().st_mtime_ns == stamp  # read, not recomputed
    assert_losses_equal(again, want, tol=0)

    good = path.read_bytes()
    for damage, why in [
        (b"not a safetensors file", "unreadable"),
        (good[: len(good) // 2], "unreadable"),
    ]:
        path.write_bytes(damage)
        with pytest.warns(UserWarning, match=why):
            got, *_ = fit(tiny_model_dir, pairs_file, tmp_path, steps=2, reference="precomputed")
        assert_losses_equal(got, want, tol=0)
        assert path.read_bytes() == good  # rebuilt, identical

    from safetensors.torch import load_file, save_file

    table = load_file(str(path))
    save_file(table, str(path), metadata={"key": "another model"})
    with pytest.warns(UserWarning, match="stale"):
        fit(tiny_model_dir, pairs_file, tmp_path, steps=2, reference="precomputed")
    table["train"][0, 0, 0] = float("nan")
    key = path.stem
    save_file(table, str(path), metadata={"key": key})
    with pytest.warns(UserWarning, match="damaged"):
        got, *_ = fit(tiny_model_dir, pairs_file, tmp_path, steps=2, reference="precomputed")
    assert_losses_equal(got, want, tol=0)

    # other data or other tokenization settings: another key, another file
    fit(tiny_model_dir, pairs_file, tmp_path, steps=1, reference="precomputed",
        data_kwargs={"max_length": 20, "max_prompt_length": 8})  # fmt: skip
    assert len(list((tmp_path / "ref-cache").glob("*.safetensors"))) == 2


def test_lora_adapter_reference_equals_a_copy_and_exports_merged(
    tiny_model_dir, pairs_file, tmp_path
):
    from transformers import AutoModelForCausalLM

    lora = LoRA(r=4, alpha=8)
    copied, *_ = fit(tiny_model_dir, pairs_file, tmp_path, lora=lora, reference="copy")
    adapter, module, trainer = fit(tiny_model_dir, pairs_file, tmp_path, lora=lora)
    assert module.reference_mode == "adapter" and module.reference is None
    assert adapter[0] == pytest.approx(math.log(2), abs=1e-6)
    assert_losses_equal(adapter, copied)
    assert adapter[-1] < adapter[0]
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    from lit_dpo.export import export_policy
    from lit_dpo.logps import sequence_logps

    out = export_policy(module, tmp_path / "hf")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    batch = next(iter(trainer.datamodule.train_dataloader()))
    with torch.no_grad():
        want = sequence_logps(module.policy.eval(), batch).sum
        got = sequence_logps(merged.eval(), batch).sum
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)  # the frozen base is not stored
    loaded = DPOModule.load_from_checkpoint(ckpt, weights_only=True)
    with torch.no_grad():
        again = sequence_logps(loaded.policy.eval(), batch).sum
    torch.testing.assert_close(again, want, atol=1e-6, rtol=1e-6)


def test_packing_and_length_grouping_give_the_padded_losses(tiny_model_dir, pairs_file, tmp_path):
    padded, *_ = fit(tiny_model_dir, pairs_file, tmp_path, data_kwargs={"packing": False})
    packed, *_ = fit(tiny_model_dir, pairs_file, tmp_path, data_kwargs={"packing": True})
    assert_losses_equal(packed, padded)
    grouped, *_ = fit(tiny_model_dir, pairs_file, tmp_path, data_kwargs={"group_by_length": True})
    assert grouped[0] == pytest.approx(math.log(2), abs=1e-6) and len(grouped) == 3


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(
    tiny_model_dir, pairs_file, tmp_path
):
    sgd = functools.partial(torch.optim.SGD, lr=1.0)

    def weights(batch_size, accumulate):
        L.seed_everything(0)
        module = DPOModule(tiny_model_dir, optimizer=sgd, lr_scheduler=None)
        data = PreferenceDataModule(pairs_file, tokenizer=tiny_model_dir, batch_size=batch_size,
                                    val_fraction=0.25)  # fmt: skip
        L.Trainer(
            accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
            default_root_dir=str(tmp_path),
        ).fit(module, data)  # fmt: skip
        return module.policy.state_dict()

    one, accumulated = weights(4, 1), weights(2, 2)
    start = DPOModule(tiny_model_dir)
    start.configure_model()
    moved = 0.0
    for name, value in one.items():
        torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-5, msg=name)
        moved = max(moved, (value - start.policy.state_dict()[name]).abs().max().item())
    assert moved > 1e-4  # the step changed the weights: the comparison means something


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train_from_ln2(tiny_model_dir, pairs_file, tmp_path, precision):
    losses, module, _ = fit(
        tiny_model_dir, pairs_file, tmp_path, trainer_kwargs={"precision": precision},
        gradient_checkpointing=True,
    )  # fmt: skip
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference, any dtype
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    dtype = next(module.policy.parameters()).dtype
    assert dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)


def test_grad_norm_is_logged_before_clipping(tiny_model_dir, pairs_file, tmp_path):
    _, _, trainer = fit(
        tiny_model_dir, pairs_file, tmp_path, steps=2,
        trainer_kwargs={"gradient_clip_val": 1e-3, "log_every_n_steps": 1},
    )  # fmt: skip
    norm = trainer.callback_metrics["train/grad_norm"].item()
    assert norm > 1e-3  # the norm before clipping, not the clipped 1e-3


def test_precomputed_needs_a_datamodule_but_not_to_load(tiny_model_dir, pairs_file, tmp_path):
    from test_module import pairs_batch

    module = DPOModule(tiny_model_dir, reference="precomputed")
    module.configure_model()  # loading (e.g. to export a checkpoint) computes nothing
    with pytest.raises(ValueError, match="needs a Trainer with a PreferenceDataModule"):
        module(pairs_batch() | {"index": torch.arange(4)})

    _, module, trainer = fit(tiny_model_dir, pairs_file, tmp_path, steps=1, reference="precomputed")
    trainer.save_checkpoint(tmp_path / "pre.ckpt")
    loaded = DPOModule.load_from_checkpoint(tmp_path / "pre.ckpt", weights_only=True)
    for name, value in module.policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[name], value), name


@pytest.mark.slow  # inductor compiles for about a minute on 2 cores
def test_compiled_decoder_layers_give_the_eager_losses(tiny_model_dir, pairs_file, tmp_path):
    eager, *_ = fit(tiny_model_dir, pairs_file, tmp_path, steps=2)
    compiled, module, _ = fit(tiny_model_dir, pairs_file, tmp_path, steps=2, compile=True)
    assert_losses_equal(compiled, eager, tol=1e-5)
    compiled_layers = [m for m in module.policy.modules() if m._compiled_call_impl is not None]
    assert len(compiled_layers) == 2  # each decoder layer


# -- the extension point: a strategy defined outside lit_dpo (docs/architecture.md's recipe) ----

from lit_dpo.logps import sequence_logps  # noqa: E402
from lit_dpo.reference import REFERENCES, Reference, register  # noqa: E402


class DetachedPolicyReference(Reference):
    """The current policy itself, detached, as the reference: Delta = 0 at every step, so the
    sigmoid loss is exactly ln 2 throughout, while its gradient (through the policy side) is
    beta/2 * grad(log pi(y_c) - log pi(y_r)): the policy still learns."""

    def logps(self, policy, batch, stage):
        with torch.no_grad():
            return sequence_logps(policy, batch, self.settings.chunk_size)


@pytest.fixture
def detached_strategy():
    register("detached-policy")(DetachedPolicyReference)
    yield "detached-policy"
    del REFERENCES["detached-policy"]


def test_a_strategy_registered_outside_the_core_trains(
    tiny_model_dir, pairs_file, tmp_path, detached_strategy
):
    before = DPOModule(tiny_model_dir)
    before.configure_model()
    losses, module, _ = fit(tiny_model_dir, pairs_file, tmp_path, reference=detached_strategy)
    assert module.reference_mode == "detached-policy" and module.reference is None
    assert losses == pytest.approx([math.log(2)] * 3, abs=1e-6)
    moved = [
        n for n, p in module.policy.named_parameters()
        if not torch.equal(p, before.policy.state_dict()[n])
    ]  # fmt: skip
    assert moved  # the policy trained

    with pytest.raises(ValueError, match="a separate reference needs the path"):
        DPOModule(tiny_model_dir, reference=detached_strategy, ref_model_name_or_path="x")
    with pytest.raises(ValueError, match="unknown reference strategy 'nope'; known: none, copy"):
        DPOModule(tiny_model_dir, reference="nope")
