"""DPOModule: step-0 values, an independent Eq. 7, learning, the frozen reference, checkpoints."""

import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_dpo.module import DPOModule

BETA = 0.1


def pairs_batch(n_pairs=4, vocab=320, seed=0):
    """A collated batch: rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected, right-padded.
    Prompts have 3-5 tokens, completions 2-6; labels mask prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    tok = lambda k: torch.randint(6, vocab, (k,), generator=g).tolist()  # noqa: E731
    prompts = [tok(rand(3, 5)) for _ in range(n_pairs)]
    rows = [(p, tok(rand(2, 6))) for p in prompts] + [(p, tok(rand(2, 6))) for p in prompts]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seq_logps(model, batch):
    """Independent of lit_dpo.logps: full logits, log-softmax, gather, masked sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logp = logits[:, :-1].double().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])
    return (logp.squeeze(-1) * keep).sum(1)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, check_dtype=False)


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(defaults | kwargs))


def loader(batches):
    return DataLoader(batches, batch_size=None)


def test_step0_loss_is_exactly_ln2_and_ties_count_half(tiny_model_dir):
    module = DPOModule(tiny_model_dir, beta=BETA)
    (metrics,) = trainer().validate(module, loader([pairs_batch(seed=s) for s in range(2)]))
    # bitwise, in fp32: every log-ratio is exactly 0
    assert metrics["val/loss"] == torch.tensor(math.log(2)).item()
    assert metrics["val/rewards/margins"] == 0.0
    assert metrics["val/rewards/accuracies"] == 0.5  # documented: a tie counts as half


def test_sigmoid_loss_matches_independent_eq7(tiny_model_dir, tiny_ref_dir):
    """Policy and reference are different models: Delta != 0. In float64, so that the two
    computations' different summation orders stay far below the 1e-6 tolerance."""
    module = DPOModule(tiny_model_dir, ref_model_name_or_path=tiny_ref_dir, beta=0.5)
    module.configure_model()
    module.double()
    batch = pairs_batch()
    out = module(batch)
    with torch.no_grad():
        p, r = seq_logps(module.policy, batch), seq_logps(module.reference, batch)
    n = len(p) // 2
    delta = (p[:n] - r[:n]) - (p[n:] - r[n:])
    expected = -F.logsigmoid(0.5 * delta)  # paper Eq. 7, per pair
    assert delta.abs().min() > 1e-3  # the check is not vacuous
    close(out["losses"].detach(), expected)
    close(out["chosen_rewards"], 0.5 * (p[:n] - r[:n]))
    close(out["rejected_rewards"], 0.5 * (p[n:] - r[n:]))


def test_combined_losses_and_reference_free(tiny_model_dir):
    """RPO = sigmoid + 0.2 * per-token NLL of the chosen completion; reference-free = ref 0."""
    batch = pairs_batch()
    rpo = DPOModule(tiny_model_dir, loss_type=["sigmoid", "nll"], loss_weights=[1.0, 0.2])
    rpo.configure_model()
    with torch.no_grad():
        out = rpo(batch)
        p = seq_logps(rpo.policy, batch)
    n = len(p) // 2
    n_tokens = (batch["labels"][:n, 1:] != -100).sum(1)
    expected = math.log(2) - 0.2 * p[:n] / n_tokens
    close(out["losses"], expected)

    free = DPOModule(tiny_model_dir, reference_free=True, beta=BETA)
    free.configure_model()
    assert free.reference is None
    with torch.no_grad():
        out = free(batch)
    close(out["losses"], -F.logsigmoid(BETA * (p[:n] - p[n:])))


def test_overfitting_a_few_pairs_learns_and_leaves_the_reference_alone(tiny_model_dir, tmp_path):
    batches = [pairs_batch(seed=0)]
    module = DPOModule(
        tiny_model_dir,
        beta=BETA,
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
        lr_scheduler=None,
    )
    module.configure_model()
    policy0 = {k: v.clone() for k, v in module.policy.state_dict().items()}
    ref0 = {k: v.clone() for k, v in module.reference.state_dict().items()}

    t = trainer(max_steps=30, default_root_dir=tmp_path)
    t.fit(module, loader(batches))
    assert {"train/loss", "train/rewards/accuracies", "train/grad_norm"} <= set(t.logged_metrics)
    (metrics,) = t.validate(module, loader(batches))
    assert metrics["val/rewards/accuracies"] == 1.0
    assert metrics["val/rewards/margins"] > 1.0
    assert metrics["val/loss"] < 0.3
    assert any(not torch.equal(policy0[k], v) for k, v in module.policy.state_dict().items())
    assert all(torch.equal(ref0[k], v) for k, v in module.reference.state_dict().items())
    assert module.policy.training and not module.reference.training
    assert not any(p.requires_grad for p in module.reference.parameters())

    # The reference stays out of the checkpoint and is rebuilt from its source on load.
    path = tmp_path / "dpo.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith("reference.") for k in ckpt["state_dict"])
    loaded = DPOModule.load_from_checkpoint(path, weights_only=True)
    for k, v in module.policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[k], v)
    for k, v in ref0.items():
        assert torch.equal(loaded.reference.state_dict()[k], v)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": -0.1}, "beta must be positive"),
        ({"loss_type": "dpo"}, "unknown loss_type 'dpo'"),
        ({"loss_type": ["sigmoid", "nll"], "loss_weights": [1.0]}, "one weight per loss_type"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"reference_free": True, "loss_type": "apo_zero"}, r"\['apo_zero'\] needs a reference"),
        ({"beta": math.nan}, "beta must be positive"),
        ({"loss_type": ["sigmoid", "nll"], "loss_weights": [1.0, math.inf]}, "must be finite"),
        ({"reference_free": True, "ref_model_name_or_path": "x"}, "unset ref_model_name_or_path"),
        ({"logps_chunk_size": 0}, "logps_chunk_size must be at least 1"),
    ],
)
def test_bad_arguments_fail_before_loading_anything(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOModule("no/such-model", **kwargs)
