"""Per-sequence log-probabilities of completion tokens, without a (2B, T, V) fp32 logits tensor.

Only hidden states at completion positions go through the LM head, a chunk of tokens at a time,
upcast to fp32 for the log-softmax. Under autograd each chunk is checkpointed: backward
recomputes its (chunk, V) logits instead of keeping them, so memory stays flat as V grows.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Attention implementations that keep packed sequences apart when given restarting position_ids
# (transformers >= 4.56: masking_utils makes a block-diagonal mask; flash runs varlen).
PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
LOGITS_PER_CHUNK = 2**24  # default chunk: 16M logits (64 MB in fp32), at any vocabulary size


class SequenceLogps(NamedTuple):
    """Per-sequence statistics over completion tokens, each (N,)."""

    sum: Tensor  # log pi(y | x): summed over completion tokens
    mean: Tensor  # the same, averaged per token
    logits_mean: Tensor  # mean raw logit over completion tokens and vocabulary (detached, for logs)


def completion_logps(
    hidden: Tensor,
    labels: Tensor,
    lm_head: nn.Module,
    chunk_size: int | None = None,
    softcap: float | None = None,
    row_ids: Tensor | None = None,
    n_rows: int | None = None,
) -> SequenceLogps:
    """Log-probs of `labels` under the LM head applied to `hidden`.

    Args:
        hidden: (N, T, H) last hidden states; position t predicts token t + 1.
        labels: (N, T) token ids aligned with the inputs (not shifted), `-100` on prompt and pad.
        lm_head: maps (n, H) -> (n, V).
        chunk_size: completion tokens per LM-head call. None: as many as keep a chunk's logits
            within `LOGITS_PER_CHUNK` (1024 tokens would be 400 MB of fp32 logits at V = 100k).
        softcap: final logit soft-capping (Gemma 2's `final_logit_softcapping`), if any.
        row_ids: (N, T) the sequence each token belongs to, for packed batches (several
            sequences in one row); None: each of the N rows is one sequence.
        n_rows: how many sequences `row_ids` numbers (default: N).
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden (N, T, H) and labels (N, T) disagree: {hidden.shape} vs {labels.shape}"
        )
    targets = labels[:, 1:]  # (N, T-1): token t+1 is predicted at position t
    mask = targets != IGNORE_INDEX
    if row_ids is None:
        rows, n_rows = mask.nonzero()[:, 0], len(labels)  # (n,) sequence of each completion token
    else:  # packed: a sequence starts with prompt tokens, so no target crosses a boundary
        rows, n_rows = row_ids[:, 1:][mask], n_rows or len(labels)
    h = hidden[:, :-1][mask]  # (n, H): completion positions only
    y = targets[mask]  # (n,)
    n_tokens = torch.zeros(n_rows, dtype=torch.long, device=y.device).index_add_(
        0, rows, torch.ones_like(y)
    )
    if (n_tokens == 0).any():
        empty = (n_tokens == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no completion tokens to score")

    if chunk_size is None:
        chunk_size = max(1, LOGITS_PER_CHUNK // getattr(lm_head, "out_features", 16384))

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
    zeros = token_logps.new_zeros(n_rows)
    total = zeros.index_add(0, rows, token_logps)
    return SequenceLogps(
        sum=total,
        mean=total / n_tokens,
        logits_mean=zeros.index_add(0, rows, logit_means) / n_tokens,
    )


def packing_unsupported(model: nn.Module) -> str | None:
    """Why `model` would read a packed batch wrongly (sequences attending across each other), or
    None when it reads one right: a supported attention, in a model whose code builds its mask
    with transformers' `masking_utils` (which finds the packed sequences in `position_ids`)."""
    if callable(getattr(model, "get_base_model", None)):  # PEFT
        model = model.get_base_model()
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn not in PACKED_ATTENTION:
        return f"the model's attention {attn!r} is not one of {', '.join(PACKED_ATTENTION)}"
    modules = (sys.modules.get(c.__module__) for c in type(model).__mro__)
    if not any(hasattr(m, "create_causal_mask") for m in modules):
        return f"{type(model).__name__} does not build its mask with transformers' masking_utils"
    return None


class _CompletionHead(nn.Module):
    """Stands in for the LM head during one forward pass: scores the completion tokens of the
    batch with `completion_logps` and keeps the result, returning no logits."""

    def __init__(self, head: nn.Module, batch: dict[str, Tensor], **kwargs):
        super().__init__()
        self.head, self.batch, self.kwargs = head, batch, kwargs
        self.result: SequenceLogps | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        b = self.batch
        self.result = completion_logps(
            hidden, b["labels"], self.head, row_ids=b.get("row_ids"), **self.kwargs
        )
        return hidden[:, :0]  # (N, 0, H): what the model returns as `logits`


def sequence_logps(
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int | None = None
) -> SequenceLogps:
    """Log-probs of the completions in a collated `batch` under a Hugging Face causal LM.

    `batch` holds `input_ids` and `labels` (N, T) with either `attention_mask` (N rows, padded)
    or `position_ids` and `row_ids` (packed: sequences side by side in one row, each restarting
    its positions, from which transformers builds a block-diagonal causal mask) and `n_rows`.

    The model's own forward runs once over all rows, with the LM head swapped for one that
    sends only completion positions through it. Going through the root forward keeps every
    wrapper's hooks in play (FSDP2 gathers the root's parameters there; PEFT routes adapters).
    """
    head = model.get_output_embeddings()
    scorer = _CompletionHead(
        head,
        batch,
        chunk_size=chunk_size,
        softcap=getattr(model.config, "final_logit_softcapping", None),
        n_rows=int(batch["n_rows"]) if "n_rows" in batch else None,
    )
    model.set_output_embeddings(scorer)
    try:
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        )
    finally:
        model.set_output_embeddings(head)
    return scorer.result
