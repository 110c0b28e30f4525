"""The implicit reward of a DPO policy: "your language model is secretly a reward model".

A policy trained with DPO against a reference defines the reward (DPO paper, Eq. 5 / Section 5)

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))

up to a function of the prompt alone, so rewards compare responses to the same prompt (ranking,
best-of-N), not across prompts. Log-probs are summed over the response tokens, EOS included, the
way DPOModule computes them in training. Responses given as text are tokenized by the data
module's own rules (`lit_dpo.data.tokenize_completions`: chat template, BOS once, EOS once), so a
(prompt, response) here gets exactly the reward DPOModule would log for it in a pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_dpo.data import collate_sequences, tokenize_completions
from lit_dpo.logps import sequence_logps
from lit_dpo.utils import eval_mode, model_device, pad_token_id

Messages = list[dict[str, str]]


def tokenize_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Messages],
    responses: Sequence[str | Messages],
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) per (prompt, response), tokenized as PreferenceDataModule
    tokenizes `prompt`/`completion` rows, whole (never truncated).

    A string prompt is one user message when the tokenizer has a chat template (the response
    then is one assistant message), plain text otherwise; message lists are used as given.
    """
    if prompts and (tokenizer.chat_template or not isinstance(prompts[0], str)):

        def as_messages(value: str | Messages, role: str) -> Messages:
            return [{"role": role, "content": value}] if isinstance(value, str) else list(value)

        prompts = [as_messages(p, "user") for p in prompts]
        responses = [as_messages(r, "assistant") for r in responses]
    return tokenize_completions(tokenizer, prompts, responses, where="implicit_reward")


def log_ratios(
    policy: nn.Module,
    reference: nn.Module | None,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
) -> Tensor:
    """log pi(y|x) - log pi_ref(y|x) per row, (N,), summed over the completion tokens.

    `reference` None: log pi_ref = 0 (reference-free DPO). The models are run in eval mode under
    no_grad and given back in the mode they came in. Rows are right-padded, so every row's
    positions start at 0, as in training and in left-padded generation.
    """
    sequences = list(zip(prompt_ids, completion_ids, strict=True))
    out = []
    with eval_mode(policy, reference):
        for i in range(0, len(sequences), batch_size):
            batch = collate_sequences(sequences[i : i + batch_size], pad_token_id)  # (N, T)
            batch = {k: v.to(model_device(policy)) for k, v in batch.items()}
            ratio = sequence_logps(policy, batch).sum
            if reference is not None:
                ratio = ratio - sequence_logps(reference, batch).sum.to(ratio.device)
            out.append(ratio.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def implicit_reward(
    policy: nn.Module,
    reference: nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Messages],
    responses: Sequence[str | Messages],
    beta: float,
    batch_size: int = 16,
) -> Tensor:
    """The DPO implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) of each (prompt, response).

    Args:
        policy: the DPO-trained causal LM (e.g. `DPOModule.policy`).
        reference: its reference (e.g. `DPOModule.reference`); None: reference-free (log pi).
        tokenizer: the tokenizer the pairs were trained with.
        prompts: user messages (strings) or message lists, one per response.
        responses: assistant replies (strings) or message lists.
        beta: the beta the policy was trained with (it only scales the reward).
        batch_size: rows per forward pass.

    Returns:
        (N,) rewards, in the models' dtype (at least float32), on the CPU.
    """
    prompt_ids, response_ids = tokenize_responses(tokenizer, prompts, responses)
    return beta * log_ratios(
        policy, reference, prompt_ids, response_ids, pad_token_id(tokenizer), batch_size
    )


def best_of_n(
    policy: nn.Module,
    reference: nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Messages],
    candidates: Sequence[Sequence[str]],
    beta: float = 1.0,
    batch_size: int = 16,
) -> tuple[list[str], Tensor]:
    """Pick, for each prompt, the candidate with the highest implicit reward (best-of-N with the
    DPO policy as the reward model).

    Args:
        candidates: N responses per prompt (e.g. N samples of the reference), a P x N list.

    Returns:
        The best candidate per prompt, and the (P, N) rewards (ties go to the first).
    """
    n = {len(c) for c in candidates}
    if len(candidates) != len(prompts) or len(n) != 1 or 0 in n:
        raise ValueError("candidates must hold the same number N >= 1 of responses per prompt")
    flat_prompts = [p for p, c in zip(prompts, candidates, strict=True) for _ in c]
    flat = [r for c in candidates for r in c]
    rewards = implicit_reward(policy, reference, tokenizer, flat_prompts, flat, beta, batch_size)
    rewards = rewards.view(len(prompts), n.pop())  # (P, N)
    best = rewards.argmax(1).tolist()
    return [c[i] for c, i in zip(candidates, best, strict=True)], rewards
