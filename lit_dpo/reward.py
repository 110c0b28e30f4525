"""The implicit reward of a DPO policy: "your language model is secretly a reward model".

A policy trained with DPO against a reference defines the reward (DPO paper, Eq. 5 / Section 5)

    r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x))

up to a function of the prompt alone, so rewards compare responses to the same prompt (ranking,
best-of-N), not across prompts. Log-probs are summed over the response tokens, EOS included, the
way DPOModule computes them in training. A (prompt, response) is tokenized by the data module's
own rules (`lit_dpo.data.tokenize_completions`) for a row of the same kind: strings as plain text
(BOS once, EOS once, no chat template, as PreferenceDataModule reads string rows), message lists
with the chat template. So a (prompt, response) here gets exactly the reward DPOModule logs for
it in a pair of the same kind: pass message lists for a policy trained on conversations.
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
    tokenizes a `prompt`/`completion` row of the same kind, whole (never truncated).

    A string prompt with a string response is plain text, as a string row is in training, with
    or without a chat template. Where either is a message list the pair is a conversation,
    rendered with the chat template; a string on the other side is then one message (the user's
    prompt, the assistant's response).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    chat = [
        not (isinstance(p, str) and isinstance(r, str))
        for p, r in zip(prompts, responses, strict=True)
    ]
    ids: list = [None] * len(prompts)
    for kind in (False, True):  # each kind in one call, as a split holds one kind of row
        rows = [i for i, c in enumerate(chat) if c == kind]
        if not rows:
            continue
        p = [_as(prompts[i], "user", kind) for i in rows]
        r = [_as(responses[i], "assistant", kind) for i in rows]
        where = f"implicit_reward ({'conversations' if kind else 'plain-text pairs'})"
        out = tokenize_completions(tokenizer, p, r, where=where)
        for i, p_ids, r_ids in zip(rows, *out, strict=True):
            ids[i] = (p_ids, r_ids)
    return [p for p, _ in ids], [r for _, r in ids]


def _as(value: str | Messages, role: str, chat: bool) -> str | Messages:
    """A string as one message of `role` in a conversation; anything else as given."""
    return [{"role": role, "content": value}] if chat and isinstance(value, str) else value


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
        prompts: plain-text prompts or message lists, one per response (see
            `tokenize_responses`: a string prompt with a string response is plain text, not
            rendered with the chat template; pass `[{"role": "user", "content": ...}]` for that).
        responses: replies: strings or message lists.
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
