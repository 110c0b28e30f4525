"""The implicit reward API: beta * (log pi(y|x) - log pi_ref(y|x)) against an independent
full-logits computation, best-of-N ranking, and the padding/batching it must not depend on."""

import pytest
import torch

from conftest import build_model
from lit_dpo.reward import best_of_n, implicit_reward, log_ratios, tokenize_responses

PROMPTS = ["Review the film.", "What did you think of the movie?", "Write a short review."]
RESPONSES = ["The movie was wonderful.", "boring", "I loved the acting; the plot was weak!"]
# As user messages: a conversation, rendered with the chat template (the responses, strings,
# become assistant messages). String prompts with string responses are plain text.
CHATS = [[{"role": "user", "content": p}] for p in PROMPTS]
BETA = 0.1


@pytest.fixture(scope="module")
def models(tokenizer):
    """Two different tiny Llamas in float64, so that 1e-6 tolerances test the logic, not fp32."""
    return build_model(len(tokenizer), seed=0).double(), build_model(
        len(tokenizer), seed=1
    ).double()


def reference_ids(tokenizer, prompt, response):
    """Independent of lit_dpo: render the chat by hand, cut the completion off the full text."""
    messages = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False
    )
    assert full.startswith(prompt_text)
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c = tokenizer(full[len(prompt_text) :].rstrip(), add_special_tokens=False)["input_ids"]
    assert c[-1] == tokenizer.eos_token_id  # the template's end of turn: EOS once
    return p, c


def logp_full(model, prompt_ids, completion_ids):
    """Sum of log p(completion | prompt) from one unpadded forward and the full logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()  # (T-1, V): position t -> t+1
    logp = logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(prompt_ids) - 1 :].sum()  # the completion tokens only


def test_tokenization_matches_the_data_module(tokenizer):
    prompt_ids, response_ids = tokenize_responses(tokenizer, CHATS, RESPONSES)
    for p, r, got_p, got_r in zip(PROMPTS, RESPONSES, prompt_ids, response_ids, strict=True):
        expected_p, expected_r = reference_ids(tokenizer, p, r)
        assert got_p == expected_p and got_r == expected_r
        assert got_p[0] == tokenizer.bos_token_id and got_p[1] != tokenizer.bos_token_id


def test_implicit_reward_equals_independent_computation(tokenizer, models):
    policy, reference = models
    got = implicit_reward(policy, reference, tokenizer, CHATS, RESPONSES, beta=BETA)
    expected = torch.stack(
        [
            BETA * (logp_full(policy, *ids) - logp_full(reference, *ids))
            for ids in (
                reference_ids(tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES, strict=True)
            )
        ]
    )
    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got.abs() > 1e-3).all()  # two different models: the rewards are not trivially 0


def test_reference_free_and_self_reference(tokenizer, models):
    policy, _ = models
    free = implicit_reward(policy, None, tokenizer, CHATS, RESPONSES, beta=1.0)
    expected = torch.stack(
        [
            logp_full(policy, *reference_ids(tokenizer, p, r))
            for p, r in zip(PROMPTS, RESPONSES, strict=True)
        ]
    )
    torch.testing.assert_close(free, expected, atol=1e-6, rtol=0)
    same = implicit_reward(policy, policy, tokenizer, CHATS, RESPONSES, beta=BETA)
    assert torch.equal(same, torch.zeros(3, dtype=torch.float64))  # pi = pi_ref: reward 0


def test_batching_and_padding_do_not_change_rewards(tokenizer, models):
    policy, reference = models
    prompt_ids, response_ids = tokenize_responses(tokenizer, CHATS, RESPONSES)
    pad = tokenizer.pad_token_id
    one = log_ratios(policy, reference, prompt_ids, response_ids, pad, batch_size=1)
    all_ = log_ratios(policy, reference, prompt_ids, response_ids, pad, batch_size=16)
    torch.testing.assert_close(one, all_, atol=1e-9, rtol=0)


def test_modes_restored_and_no_grad(tokenizer, models):
    policy, reference = models
    policy.train(), reference.eval()
    out = implicit_reward(policy, reference, tokenizer, CHATS[:1], RESPONSES[:1], beta=BETA)
    assert policy.training and not reference.training  # each model back in its own mode
    assert not out.requires_grad
    policy.eval()


def test_best_of_n_picks_the_highest_implicit_reward(tokenizer, models):
    policy, reference = models
    candidates = [RESPONSES, RESPONSES[::-1]]
    best, rewards = best_of_n(policy, reference, tokenizer, CHATS[:2], candidates, beta=BETA)
    assert rewards.shape == (2, 3)
    for i, prompt in enumerate(CHATS[:2]):
        flat = implicit_reward(policy, reference, tokenizer, [prompt] * 3, candidates[i], BETA)
        torch.testing.assert_close(rewards[i], flat, atol=1e-9, rtol=0)
        assert best[i] == candidates[i][int(flat.argmax())]
    with pytest.raises(ValueError, match="same number"):
        best_of_n(policy, reference, tokenizer, CHATS[:2], [RESPONSES, RESPONSES[:2]])


@pytest.mark.parametrize("template", [None, "conftest's"])
def test_string_prompts_are_plain_text(models, template):
    """A string prompt with a string response is plain text, as PreferenceDataModule reads
    string rows, with or without a chat template: BOS + prompt, response + EOS."""
    from conftest import CHAT_TEMPLATE, build_tokenizer

    plain = build_tokenizer(chat_template=template and CHAT_TEMPLATE)
    prompt_ids, response_ids = tokenize_responses(plain, ["The movie was"], [" wonderful."])
    assert prompt_ids[0] == plain("The movie was")["input_ids"]
    assert response_ids[0] == plain(" wonderful.", add_special_tokens=False)["input_ids"] + [
        plain.eos_token_id
    ]
    policy, reference = models
    got = implicit_reward(policy, reference, plain, ["The movie was"], [" wonderful."], beta=1.0)
    expected = logp_full(policy, prompt_ids[0], response_ids[0]) - logp_full(
        reference, prompt_ids[0], response_ids[0]
    )
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=0)


def test_each_pair_is_tokenized_as_its_own_kind(tokenizer):
    """Plain-text pairs and conversations in one call keep their order and their own rules."""
    mixed = tokenize_responses(tokenizer, [PROMPTS[0], CHATS[1]], RESPONSES[:2])
    plain = tokenize_responses(tokenizer, PROMPTS[:1], RESPONSES[:1])
    chat = tokenize_responses(tokenizer, CHATS[1:2], RESPONSES[1:2])
    assert mixed == (plain[0] + chat[0], plain[1] + chat[1])
    assert plain[0][0] != reference_ids(tokenizer, PROMPTS[0], RESPONSES[0])[0]
