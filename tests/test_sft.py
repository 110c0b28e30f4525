"""SFTModule: the token-level NLL against an independent computation, only the chosen rows run,
learning happens, and the HF export works."""

import functools

import datasets
import torch
import torch.nn.functional as F
from test_module import loader, pairs_batch, trainer
from transformers import AutoModelForCausalLM

from lit_dpo.data import PreferenceDataModule
from lit_dpo.export import export_policy
from lit_dpo.sft import SFTModule


def token_mean_nll(model, batch):
    """Independent of lit_dpo.logps: full logits over the chosen rows, cross-entropy with
    ignore_index, averaged over every completion token of the batch (not per sequence)."""
    n = batch["input_ids"].shape[0] // 2
    ids, mask, labels = batch["input_ids"][:n], batch["attention_mask"][:n], batch["labels"][:n]
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )


def test_loss_is_the_token_level_nll_of_the_chosen_rows(tiny_model_dir):
    module = SFTModule(tiny_model_dir)
    module.configure_model()
    module.double()
    batch = pairs_batch(n_pairs=4, seed=3)
    nll, n_tokens = module(batch)
    expected = token_mean_nll(module.policy, batch)
    torch.testing.assert_close((nll / n_tokens).detach(), expected, atol=1e-6, rtol=0)
    assert n_tokens == (batch["labels"][:4, 1:] != -100).sum()
    # Token-level, not the mean of per-sequence means: the completions have different lengths.
    per_token = (batch["labels"][:4, 1:] != -100).sum(1)
    assert len(set(per_token.tolist())) > 1


def test_only_the_chosen_rows_reach_the_model(tiny_model_dir):
    module = SFTModule(tiny_model_dir)
    module.configure_model()
    seen = []
    module.policy.model.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw), with_kwargs=True
    )
    batch = pairs_batch(n_pairs=4, seed=0)
    with torch.no_grad():
        nll, _ = module(batch)
        other = dict(batch)
        other["input_ids"] = batch["input_ids"].clone()
        other["input_ids"][4:] = 7  # the rejected rows: anything at all
        nll_other, _ = module(other)
    assert [kw["input_ids"].shape[0] for kw in seen] == [4, 4]  # B rows, not 2B
    assert torch.equal(nll, nll_other)


def test_fit_learns_and_exports(tiny_model_dir, tokenizer, tmp_path):
    """Overfit the chosen completions of 4 in-memory prompt/completion pairs through the data
    module: the validation NLL drops, the weights change, and the export reloads."""
    rows = {
        "prompt": [f"Review film {i}:" for i in range(4)],
        "chosen": [" a delight from start to finish.", " wonderful.", " great music!", " loved"],
        "rejected": [" boring.", " terrible.", " weak.", " I wanted to leave."],
    }
    data = PreferenceDataModule(
        datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict(rows),
                "validation": datasets.Dataset.from_dict(rows),
            }
        ),
        tokenizer=tokenizer,
        batch_size=4,
    )
    module = SFTModule(
        tiny_model_dir, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), lr_scheduler=None
    )
    t = trainer(max_steps=25, default_root_dir=tmp_path, num_sanity_val_steps=0)
    (before,) = t.validate(module, data)
    module.configure_model()
    weights0 = {k: v.clone() for k, v in module.policy.state_dict().items()}
    t = trainer(max_steps=25, default_root_dir=tmp_path, check_val_every_n_epoch=100)
    t.fit(module, data)
    assert {"train/loss", "train/grad_norm"} <= set(t.logged_metrics)
    (after,) = t.validate(module, data)
    assert after["val/loss"] < 0.5 * before["val/loss"]
    assert any(not torch.equal(weights0[k], v) for k, v in module.policy.state_dict().items())

    out = export_policy(module, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in module.policy.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k


def test_val_loss_is_token_weighted_over_batches(tiny_model_dir):
    """Two validation batches of different token counts: the epoch value is the NLL of all
    their completion tokens together, not the mean of the two batch means."""
    module = SFTModule(tiny_model_dir)
    batches = [pairs_batch(n_pairs=1, seed=1), pairs_batch(n_pairs=3, seed=2)]
    (metrics,) = trainer().validate(module, loader(batches))
    with torch.no_grad():
        sums = [module(b) for b in batches]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    torch.testing.assert_close(torch.tensor(metrics["val/loss"]), expected, atol=1e-5, rtol=0)
