"""completion_logps against the plain full-logits computation."""

import pytest
import torch

from conftest import build_model
from lit_dpo.logps import completion_logps


def make_batch(vocab=320, n=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (n, t), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[1, 9:] = -100  # row 1 padded after 9 tokens
    mask = (labels != -100) | (torch.arange(t) < 4)
    return ids, mask.long(), labels


def naive(model, ids, mask, labels):
    """Full (N, T, V) logits, log-softmax, gather, sum over labelled positions."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = labels[:, 1:] != -100
    total = (logp * keep).sum(1)
    mean_logit = (logits[:, :-1].mean(-1) * keep).sum(1) / keep.sum(1)
    return total, total / keep.sum(1), mean_logit


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_matches_full_logits_values_and_gradients(chunk_size):
    model = build_model(320)
    ids, mask, labels = make_batch()
    expected = naive(model, ids, mask, labels)
    (expected[0].sum() + expected[1].sum()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = completion_logps(hidden, labels, model.lm_head, chunk_size=chunk_size)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    (got.sum.sum() + got.mean.sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_hand_worked_two_token_vocab():
    """V = 2, logits (0, ln 3) at both completion positions: p(token 1) = 3/4, p(token 0) = 1/4.
    Completion tokens [1, 0] -> log(3/4) + log(1/4) = -0.2876821 - 1.3862944 = -1.6739764."""
    head = torch.nn.Linear(1, 2, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, torch.log(torch.tensor(3.0))]))
    hidden = torch.zeros(1, 3, 1)
    labels = torch.tensor([[-100, 1, 0]])
    out = completion_logps(hidden, labels, head)
    assert out.sum.item() == pytest.approx(-1.6739764, abs=1e-6)
    assert out.mean.item() == pytest.approx(-1.6739764 / 2, abs=1e-6)


def test_refuses_mismatched_shapes_and_empty_completions():
    head = torch.nn.Linear(8, 10)
    with pytest.raises(ValueError, match="disagree"):
        completion_logps(torch.zeros(2, 5, 8), torch.zeros(2, 4, dtype=torch.long), head)
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 1
    with pytest.raises(ValueError, match=r"rows \[1\] have no completion tokens"):
        completion_logps(torch.zeros(2, 5, 8), labels, head)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_equals_padded(attn, tokenizer):
    """Padding-free: the rows side by side in one sequence with restarting position_ids give
    the padded batch's log-probs and gradients (to 1e-5), with and without a padding segment."""
    from lit_dpo.data import collate_pairs
    from lit_dpo.logps import sequence_logps

    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "prompt_input_ids": torch.randint(6, 300, (n,), generator=g).tolist(),
            "chosen_input_ids": torch.randint(6, 300, (c,), generator=g).tolist(),
            "rejected_input_ids": torch.randint(6, 300, (r,), generator=g).tolist(),
            "index": i,
        }
        for i, (n, c, r) in enumerate([(3, 5, 9), (7, 2, 4), (1, 11, 6), (10, 14, 3)])
    ]
    model = build_model(320, attn_implementation=attn)

    def run(batch):
        model.zero_grad()
        out = sequence_logps(model, batch, chunk_size=4)
        (out.sum.sum() + out.mean.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = collate_pairs(rows, pad_token_id=0)
    want, want_grads = run(padded)
    for multiple in (None, 16):
        packed = collate_pairs(rows, pad_token_id=0, packing=True, pad_to_multiple_of=multiple)
        assert packed["input_ids"].shape[0] < 8 and "attention_mask" not in packed
        assert torch.equal(packed["index"], padded["index"])
        got, grads = run(packed)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for n, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_default_chunks_hold_a_fixed_number_of_logits(monkeypatch):
    """No LM-head call sees more than LOGITS_PER_CHUNK logits, whatever the vocabulary: memory
    does not grow with V (measured in benchmarks/vocab_memory.py)."""
    import lit_dpo.logps as logps

    monkeypatch.setattr(logps, "LOGITS_PER_CHUNK", 4 * 1000)
    for vocab in (500, 1000, 4000):
        head = torch.nn.Linear(8, vocab)
        calls = []
        head.register_forward_hook(lambda m, args, out, calls=calls: calls.append(out.numel()))
        labels = torch.randint(vocab, (3, 20))
        labels[:, :2] = -100
        out = logps.completion_logps(torch.randn(3, 20, 8), labels, head)
        assert max(calls) <= 4000 and sum(calls) == 3 * 18 * vocab
        assert torch.isfinite(out.sum).all()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "qwen2"])
def test_other_architectures_match_full_logits(family):
    """The paper's GPT-2 and Pythia (GPT-NeoX), and Qwen2: the swapped LM head works for each."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_dpo.logps import sequence_logps

    sizes = {
        "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64),
        "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64),
    }  # fmt: skip
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=320, **sizes[family])
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, mask, labels = make_batch()
    want = naive(model, ids, mask, labels)
    got = sequence_logps(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
