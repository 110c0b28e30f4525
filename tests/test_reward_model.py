"""RewardModule, the explicit Bradley-Terry reward model: its loss against an independent
computation from the backbone's hidden states, the last-token head under padding, `score`, and
learning on a handful of pairs (with a checkpoint round trip)."""

import functools
import math
import warnings

import pytest
import torch

from conftest import build_model
from lit_dpo.data import collate_pairs
from lit_dpo.reward import tokenize_responses
from lit_dpo.reward_model import RewardModule

PROMPTS = ["Review the film.", "What did you think of the movie?", "Write a short review."]
CHOSEN = ["The movie was wonderful.", "I loved the acting!", "A delight from start to finish."]
REJECTED = ["boring", "The movie was terrible and boring, I wanted to leave.", "weak"]


def step(module, batch):
    """The module's validation loss of a batch, outside a Trainer (whose absence `self.log`
    warns about)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message="You are trying to `self.log")
        return module._step(batch, "val")


def pair_rows(tokenizer):
    """The pairs tokenized as plain text, as the data module and `score` tokenize them, of
    unequal lengths (so that a batch of them is padded)."""
    prompts, replies = tokenize_responses(tokenizer, PROMPTS * 2, CHOSEN + REJECTED)
    n = len(PROMPTS)
    return [
        {"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r}
        for p, c, r in zip(prompts[:n], replies[:n], replies[n:], strict=True)
    ]


@pytest.fixture
def module(tokenizer):
    """A RewardModule on a tiny float64 Llama, with a random (nonzero) head."""
    m = RewardModule(build_model(len(tokenizer), seed=0))
    m.configure_model()
    m.double()
    torch.manual_seed(3)
    with torch.no_grad():
        m.head.weight.normal_()
        m.head.bias.normal_()
    return m


def independent_rewards(model, head, rows) -> list[float]:
    """r of each sequence from its own unpadded forward through the decoder (no LM head): the
    final hidden state of its last token, times the head's weight, plus its bias."""
    out = []
    with torch.no_grad():
        for seq in rows:
            hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]  # (H,)
            out.append(float(hidden @ head.weight[0] + head.bias[0]))
    return out


def test_loss_equals_independent_computation(module, tokenizer):
    """loss = mean over pairs of -log sigma(r_c - r_r) = log(1 + exp(-(r_c - r_r))), each r
    computed apart from the module (one unpadded forward per sequence)."""
    rows = pair_rows(tokenizer)
    batch = collate_pairs(rows, pad_token_id=tokenizer.pad_token_id)
    assert batch["attention_mask"].min() == 0  # padded: the last real token is not the last column
    chosen = independent_rewards(
        module.policy, module.head, [r["prompt_input_ids"] + r["chosen_input_ids"] for r in rows]
    )
    rejected = independent_rewards(
        module.policy, module.head, [r["prompt_input_ids"] + r["rejected_input_ids"] for r in rows]
    )
    expected = sum(
        math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected, strict=True)
    ) / len(rows)
    module.eval()
    with torch.no_grad():
        rewards = module(batch)
    loss = step(module, batch)
    torch.testing.assert_close(rewards, torch.tensor(chosen + rejected, dtype=torch.float64))
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_zero_head_gives_ln2_at_step_zero(tokenizer):
    m = RewardModule(build_model(len(tokenizer), seed=0))
    m.configure_model()
    batch = collate_pairs(pair_rows(tokenizer), pad_token_id=tokenizer.pad_token_id)
    assert step(m, batch).item() == pytest.approx(math.log(2), abs=1e-7)


def test_score_is_independent_of_padding_and_matches_the_pair_batch(module, tokenizer):
    """Scored alone or in a batch of other lengths, a (prompt, reply) gets the same reward, and
    the same as in a collated pair batch (plain-text pairs, BOS once, EOS once)."""
    prompts, replies = PROMPTS * 2, CHOSEN + REJECTED
    together = module.score(prompts, replies, tokenizer=tokenizer, batch_size=6)
    alone = torch.cat(
        [module.score([p], [r], tokenizer=tokenizer) for p, r in zip(prompts, replies, strict=True)]
    )
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    batch = collate_pairs(pair_rows(tokenizer), pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(together, module(batch).float(), rtol=1e-5, atol=1e-5)
    assert module.training  # score gives the mode back


def test_packed_batches_are_refused(module, tokenizer):
    assert RewardModule.packing_refusal == "RewardModule takes padded batches only"
    batch = collate_pairs(pair_rows(tokenizer), pad_token_id=tokenizer.pad_token_id, packing=True)
    with pytest.raises(ValueError, match="padded batches only"):
        module(batch)


def test_exported_lazily():
    import lit_dpo

    assert lit_dpo.RewardModule is RewardModule


def test_learns_a_handful_of_pairs_and_reloads(tokenizer, tiny_model_dir, tmp_path):
    """Overfitting 3 pairs: the loss falls below ln 2, every pair ends up ranked right, the
    backbone moves; a checkpoint reloads to the same rewards."""
    import datasets
    import lightning as L

    from lit_dpo.data import PreferenceDataModule

    rows = [
        {"prompt": p, "chosen": c, "rejected": r}
        for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)
    ]
    data = PreferenceDataModule(
        datasets.Dataset.from_list(rows), tokenizer=tokenizer, batch_size=3, val_fraction=0.0
    )
    L.seed_everything(0, verbose=False)
    module = RewardModule(
        tiny_model_dir, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), lr_scheduler=None
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=15, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    assert trainer.callback_metrics["train/loss"] < 0.2
    replies = CHOSEN + REJECTED
    rewards = module.score(PROMPTS * 2, replies, tokenizer=tokenizer)
    assert (rewards[:3] > rewards[3:]).all()
    initial = build_model(len(tokenizer), seed=0).state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(module.policy.model.layers[0].mlp.up_proj.weight.detach(), initial)

    path = tmp_path / "rm.ckpt"
    trainer.save_checkpoint(path)
    again = RewardModule.load_from_checkpoint(path)
    torch.testing.assert_close(again.score(PROMPTS * 2, replies, tokenizer=tokenizer), rewards)
