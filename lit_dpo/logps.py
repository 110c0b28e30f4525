"""Per-sequence log-probabilities of completion tokens, without a (2B, T, V) fp32 logits tensor.

Only hidden states at completion positions go through the LM head, a chunk of tokens at a time,
upcast to fp32 for the log-softmax. Under autograd each chunk is checkpointed: backward
recomputes its (chunk, V) logits instead of keeping them, so memory stays flat as V grows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class SequenceLogps(NamedTuple):
    """Per-sequence statistics over completion tokens, each (N,)."""

    sum: Tensor  # log pi(y | x): summed over completion tokens
    mean: Tensor  # the same, averaged per token
    logits_mean: Tensor  # mean raw logit over completion tokens and vocabulary (detached, for logs)


def completion_logps(
    hidden: Tensor,
    labels: Tensor,
    lm_head: nn.Module,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> SequenceLogps:
    """Log-probs of `labels` under the LM head applied to `hidden`.

    Args:
        hidden: (N, T, H) last hidden states; position t predicts token t + 1.
        labels: (N, T) token ids aligned with the inputs (not shifted), `-100` on prompt and pad.
        lm_head: maps (n, H) -> (n, V).
        chunk_size: completion tokens per LM-head call.
        softcap: final logit soft-capping (Gemma 2's `final_logit_softcapping`), if any.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden (N, T, H) and labels (N, T) disagree: {hidden.shape} vs {labels.shape}"
        )
    targets = labels[:, 1:]  # (N, T-1): token t+1 is predicted at position t
    mask = targets != IGNORE_INDEX
    n_tokens = mask.sum(1)  # (N,)
    if (n_tokens == 0).any():
        rows = (n_tokens == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no completion tokens to score")
    rows = mask.nonzero()[:, 0]  # (n,) sequence of each completion token
    h = hidden[:, :-1][mask]  # (n, H): completion positions only
    y = targets[mask]  # (n,)

    def score(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = lm_head(h)  # (chunk, V), upcast: log-softmax needs at least fp32
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        logp = logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
        return logp, logits.detach().mean(-1)

    chunks = [
        checkpoint(score, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
        if torch.is_grad_enabled()
        else score(h[i : i + chunk_size], y[i : i + chunk_size])
        for i in range(0, len(y), chunk_size)
    ]
    token_logps = torch.cat([c[0] for c in chunks])  # (n,)
    logit_means = torch.cat([c[1] for c in chunks])  # (n,): mean over the vocabulary
    zeros = token_logps.new_zeros(len(labels))
    total = zeros.index_add(0, rows, token_logps)
    return SequenceLogps(
        sum=total,
        mean=total / n_tokens,
        logits_mean=zeros.index_add(0, rows, logit_means) / n_tokens,
    )


def sequence_logps(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 1024
) -> SequenceLogps:
    """Log-probs of the completions in a collated `batch` (`input_ids`, `attention_mask`,
    `labels`, each (N, T)) under a Hugging Face causal LM.

    The decoder runs once over all N rows; only completion positions reach the LM head.
    """
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return completion_logps(
        out.last_hidden_state,
        batch["labels"],
        model.get_output_embeddings(),
        chunk_size=chunk_size,
        softcap=getattr(model.config, "final_logit_softcapping", None),
    )
