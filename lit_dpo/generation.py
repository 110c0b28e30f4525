"""Sampling chat completions from a causal LM: the prompt and completion token ids, or text.

The sampling settings live in one place, `Sampling`; `generate` and `sample` take one, or its
fields positionally or by name (`sample(model, tokenizer, prompts, n_samples=8, seed=1)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from lit_dpo.utils import eval_mode, model_device, pad_token_id

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample completions.

    Args:
        n_samples: completions sampled per prompt.
        max_new_tokens: length limit of each completion.
        temperature: sampling temperature.
        top_p: nucleus sampling mass (1: the full distribution; top-k is never applied).
        batch_size: sequences per `model.generate` call.
        seed: seeds the torch RNG for the whole call (the caller's RNG state is restored).
    """

    n_samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 64
    seed: int = 0

    @classmethod
    def of(cls, *args: Any, **kwargs: Any) -> Sampling:
        """`of(sampling)` as it is, `of(sampling, seed=1)` with fields replaced, or
        `of(8, 48, seed=1)` / `of(n_samples=8)` from the fields, in the order above."""
        if args and isinstance(args[0], Sampling):
            if len(args) > 1:
                raise TypeError("pass a Sampling or its fields, not both positionally")
            return dataclasses.replace(args[0], **kwargs)
        return cls(*args, **kwargs)


def generate(
    model, tokenizer, prompts: Sequence[str], *args: Any, progress: bool = True, **kwargs: Any
) -> tuple[list[list[int]], list[list[int]]]:
    """Sample `n_samples` chat completions per prompt; return (prompt ids, completion ids) per
    sample, prompt-major (the samples of prompt i are rows i*n_samples ... (i+1)*n_samples-1).

    The settings are a `Sampling` or its fields (see `Sampling.of`). Each prompt is one user
    message, rendered with the chat template (`chat_prompt_ids`); the rest is `generate_ids`.
    """
    s = Sampling.of(*args, **kwargs)
    return generate_ids(model, tokenizer, chat_prompt_ids(tokenizer, prompts), s, progress=progress)


def chat_prompt_ids(tokenizer, prompts: Sequence[str | list[dict]]) -> list[list[int]]:
    """Each prompt (a string: one user message; or a list of {role, content} messages) rendered
    with the chat template and its generation prompt, as token ids."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}] if isinstance(p, str) else p,
            add_generation_prompt=True,
            tokenize=False,
        )
        for p in prompts
    ]
    # The rendered template already holds any BOS, so tokenize it without special tokens.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def generate_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *args: Any,
    progress: bool = True,
    **kwargs: Any,
) -> tuple[list[list[int]], list[list[int]]]:
    """`generate` from prompts already tokenized (e.g. a PreferenceDataModule's
    `prompt_input_ids`, rendered exactly as in training): (prompt ids, completion ids) per
    sample, prompt-major.

    The completion ids are the sampled tokens up to and including the first end-of-sequence
    token (all of them if none was sampled within `max_new_tokens`). Deterministic for a seed,
    model, batch size and machine: the global torch RNG is seeded inside `fork_rng`, so the
    caller's RNG state is left as it was. The model is run in eval mode and given back in the
    mode it came in. `progress`: show a progress bar over the batches.
    """
    from tqdm.auto import tqdm

    s = Sampling.of(*args, **kwargs)
    rows = [list(ids) for ids in prompt_ids for _ in range(s.n_samples)]
    stop = model.generation_config.eos_token_id
    stop = {tokenizer.eos_token_id, *(stop if isinstance(stop, list) else [stop])} - {None}
    pad = pad_token_id(tokenizer)
    completion_ids: list[list[int]] = []
    starts = range(0, len(rows), s.batch_size)
    with eval_mode(model), torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(s.seed)
        for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
            # Left padding: every row's prompt ends at the same column, where generation starts.
            batch = rows[start : start + s.batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch])  # (N, T)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch])
            device = model_device(model)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=0,  # transformers would add top-k 50 otherwise; we want plain nucleus
                max_new_tokens=s.max_new_tokens,
                pad_token_id=pad,
            )
            for row in out[:, width:].tolist():  # after the first stop token, only pads
                end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
                completion_ids.append(row[:end])
    return rows, completion_ids


def sample(model, tokenizer, prompts: Sequence[str], *args: Any, **kwargs: Any) -> list[list[str]]:
    """`n_samples` chat completions per prompt, as a `len(prompts) x n_samples` list of strings
    (see `generate`, which takes the same settings; the same seed gives the same samples)."""
    s = Sampling.of(*args, **kwargs)
    _, ids = generate(model, tokenizer, prompts, s)
    return by_prompt(decode(tokenizer, ids), s.n_samples)


def decode(tokenizer, completion_ids: Sequence[Sequence[int]]) -> list[str]:
    """Completion ids -> text, special tokens dropped and surrounding whitespace stripped."""
    return [t.strip() for t in tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]


def by_prompt(values: Sequence[T], n_samples: int) -> list[list[T]]:
    """Prompt-major rows (as `generate` returns them) -> one list of `n_samples` per prompt."""
    return [list(values[i : i + n_samples]) for i in range(0, len(values), n_samples)]
