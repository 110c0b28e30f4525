"""`SampleReplies`: what the policy says, as it trains. At each validation, the policy's and the
reference's replies to a few fixed prompts, each with its implicit reward, logged wherever the run
logs: text in TensorBoard, a table in Weights & Biases, and always a JSON Lines file in the log
directory (`samples-step{N}.jsonl`)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from lit_dpo.export import policy_tokenizer
from lit_dpo.generation import Sampling, chat_prompt_ids, decode, generate_ids
from lit_dpo.reward import log_ratios
from lit_dpo.utils import atomic_write, finite_json, pad_token_id

COLUMNS = ["step", "prompt", "model", "reply", "reward", "tokens"]  # of each row written


class SampleReplies(Callback):
    """At the end of each validation (in `fit` and in `validate`), sample replies to a few fixed
    prompts from the policy and from its reference, and log them with their implicit rewards
    beta * (log pi(y|x) - log pi_ref(y|x)) (summed over the reply's tokens, EOS included, as in
    training).

    Every run writes `samples-step{N}.jsonl` in its log directory, one row per reply:
    `{"step", "prompt", "model": "policy" | "reference", "reply", "reward", "tokens"}`. A
    TensorBoard logger also gets them as text (tag `samples`), a W&B logger as a table; every
    logger gets `samples/policy_reward` and `samples/reference_reward` (the mean reward of each
    model's replies: the policy's should pull ahead) and `samples/seconds`.

    The reference is sampled where it is in memory (`copy`, `separate`, and `adapter`: the policy
    with its adapters disabled). Reference-free DPO (`none`) has no reference to sample, and its
    reward is beta * log pi; a `precomputed` reference holds log-probs of the data only, so the
    replies carry no reward (null). A module without `beta` (SFT) gets replies without rewards.
    Sampling is seeded, the same at every validation: what changes is the policy. Every rank
    samples (a sharded policy needs them all); rank 0 writes. Not for FSDPStrategy (FSDP1),
    whose parameters are gathered only inside the training step: use ModelParallelStrategy.

    Args:
        prompts: a list of prompts, or a file of them: a `.jsonl` file whose rows' `prompt`
            (text, or a list of {role, content} messages) is taken, or a text file, one prompt
            a line. Text is sent as one user message through the tokenizer's chat template (plain
            text when it has none). None: the first distinct prompts of the data module's
            validation split, tokenized exactly as in training.
        n_prompts: how many prompts (the first ones).
        n_samples: replies per prompt and model.
        max_new_tokens: length limit of each reply.
        temperature: sampling temperature.
        top_p: nucleus sampling mass (1: the full distribution; 0: the likeliest token).
        seed: sampling seed (the same at every validation and for both models).
    """

    def __init__(
        self,
        prompts: list[str] | str | None = None,
        n_prompts: PositiveInt = 4,
        n_samples: PositiveInt = 1,
        max_new_tokens: PositiveInt = 48,
        temperature: PositiveFloat = 1.0,
        top_p: ClosedUnitInterval = 0.95,
        seed: int = 0,
    ):
        self.prompts = prompts
        self.n_prompts = n_prompts
        self.sampling = Sampling(n_samples, max_new_tokens, temperature, top_p, seed=seed)
        self._prompts: tuple[list[str], list[list[int]]] | None = None  # texts, token ids
        self.rows: list[dict[str, Any]] = []  # the last validation's
        self._checkpoint_step: int | None = None  # the step of the checkpoint `validate` loaded

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "SampleReplies cannot sample under FSDPStrategy (the policy's parameters are "
                "gathered only inside the training step): use ModelParallelStrategy (FSDP2), or "
                "remove the callback"
            )
        if self.prompts is not None:  # a missing or malformed file: said before any step
            read_prompts(self.prompts)
        elif not hasattr(trainer.datamodule, "val_dataset"):
            raise ValueError(
                "SampleReplies: no prompts given, and the data module has no validation split "
                "to take them from (`val_dataset`): pass `prompts` (a list or a file)"
            )
        self._prompts = None  # read again: the data may have changed
        self._checkpoint_step = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        # `validate --ckpt_path` restores the weights but not the step: name the samples by it.
        self._checkpoint_step = checkpoint.get("global_step")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        start = time.perf_counter()
        tokenizer = policy_tokenizer(pl_module)
        if self._prompts is None:
            self._prompts = self._read_prompts(trainer, tokenizer)
        texts, prompt_ids = self._prompts
        replies = sample_replies(pl_module, tokenizer, prompt_ids, self.sampling)
        step = trainer.global_step
        if trainer.state.fn != "fit" and self._checkpoint_step is not None:
            step = self._checkpoint_step
        self.rows = [{"step": step, "prompt": texts[r.pop("prompt")], **r} for r in replies]
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP
        if trainer.is_global_zero:
            seconds = time.perf_counter() - start
            self._log(trainer, step, log_dir / f"samples-step{step}.jsonl", seconds)

    def _log(self, trainer: L.Trainer, step: int, path: Path, seconds: float) -> None:
        atomic_write(
            path, "".join(finite_json(row, ensure_ascii=False) + "\n" for row in self.rows)
        )
        metrics = {"samples/seconds": seconds}
        for model in ("policy", "reference"):
            rewards = [r["reward"] for r in self.rows if r["model"] == model]
            if rewards and None not in rewards:
                metrics[f"samples/{model}_reward"] = sum(rewards) / len(rewards)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", markdown(self.rows), step)
            elif callable(getattr(logger, "log_table", None)):  # WandbLogger
                data = [[row[c] for c in COLUMNS] for row in self.rows]
                logger.log_table(key="samples", columns=COLUMNS, data=data, step=step)
            logger.log_metrics(metrics, step=step)
            logger.save()

    def _read_prompts(self, trainer: L.Trainer, tokenizer) -> tuple[list[str], list[list[int]]]:
        """(prompt texts to show, prompt token ids to sample from)."""
        if self.prompts is None:
            data = getattr(trainer.datamodule, "val_dataset", None)
            if data is None or "prompt_input_ids" not in data.column_names:
                raise ValueError(
                    "SampleReplies: no prompts given, and the data module has no validation "
                    "split to take them from: pass `prompts` (a list or a file)"
                )
            prompt_ids = distinct_prompt_ids(data, self.n_prompts)
            return [shown_prompt(tokenizer, p) for p in prompt_ids], prompt_ids
        return tokenized_prompts(tokenizer, read_prompts(self.prompts)[: self.n_prompts])


def distinct_prompt_ids(data, limit: int | None = None) -> list[list[int]]:
    """The first `limit` (None: all) distinct `prompt_input_ids` of a tokenized split, in order."""
    ids: dict[tuple[int, ...], None] = {}
    for row in data.select_columns(["prompt_input_ids"]):
        ids.setdefault(tuple(row["prompt_input_ids"]), None)
        if len(ids) == limit:
            break
    return [list(p) for p in ids]


def tokenized_prompts(
    tokenizer, prompts: Sequence[str | list[dict[str, str]]], who: str = "SampleReplies"
) -> tuple[list[str], list[list[int]]]:
    """(the prompts as text to show, their token ids to sample from): text is sent as one user
    message through the tokenizer's chat template (plain text when it has none), a message list
    as it is (shown by its last message)."""
    texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    if tokenizer.chat_template is None:
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{who}: message prompts need a chat template")
        return texts, tokenizer(list(prompts))["input_ids"]
    return texts, chat_prompt_ids(tokenizer, prompts)


def read_prompts(prompts: Sequence[str] | str) -> list[str | list[dict[str, str]]]:
    """A list as it is; a `.jsonl` file's `prompt` fields; else a text file's non-empty lines."""
    if not isinstance(prompts, str):
        return list(prompts)
    path = Path(prompts)
    if not path.is_file():
        raise FileNotFoundError(f"SampleReplies: prompts file {path} not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}, line {i}: not a JSON object with a 'prompt'") from err
    return out


def shown_prompt(tokenizer, prompt_ids: Sequence[int]) -> str:
    """A tokenized prompt as the user wrote it: inside the chat template's frame when it is one
    user message (not the system prompt and role markers around it), else its decoded text."""
    text = tokenizer.decode(prompt_ids)
    if tokenizer.chat_template is not None:
        mark = "<<lit-dpo-prompt>>"
        frame = tokenizer.apply_chat_template(
            [{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False
        )
        before, _, after = frame.partition(mark)
        if text.startswith(before) and text.endswith(after) and len(text) > len(frame) - len(mark):
            return text[len(before) : len(text) - len(after)].strip()
    return decode(tokenizer, [prompt_ids])[0]


@contextlib.contextmanager
def reference_model(pl_module: L.LightningModule) -> Iterator[nn.Module | None]:
    """The reference as a network to sample and score with: the one DPOModule holds, or the
    policy with its LoRA adapters disabled; None where none is in memory."""
    if getattr(pl_module, "reference", None) is not None:
        yield pl_module.reference
    elif getattr(pl_module, "reference_mode", None) == "adapter":
        with pl_module.policy.disable_adapter():
            yield pl_module.policy
    else:
        yield None


def sample_replies(
    pl_module: L.LightningModule,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    sampling: Sampling,
) -> list[dict[str, Any]]:
    """`n_samples` replies per prompt of the policy, then of its reference where one can be
    sampled, each `{"prompt": its index, "model", "reply", "reward", "tokens"}`; the implicit
    reward is None where it cannot be computed (see SampleReplies)."""
    policy = pl_module.policy
    sampled = {"policy": generate_ids(policy, tokenizer, prompt_ids, sampling, progress=False)}
    with reference_model(pl_module) as reference:
        if reference is not None:
            sampled["reference"] = generate_ids(
                reference, tokenizer, prompt_ids, sampling, progress=False
            )
    prompts = [p for p_ids, _ in sampled.values() for p in p_ids]
    replies = [c for _, c_ids in sampled.values() for c in c_ids]
    rewards: list[float | None] = [None] * len(replies)
    beta = getattr(pl_module.hparams, "beta", None)
    uniform = getattr(pl_module, "reference_mode", None) == "none"  # log pi_ref = 0
    if beta is not None and ("reference" in sampled or uniform):
        pad = pad_token_id(tokenizer)
        ratios = log_ratios(policy, None, prompts, replies, pad)  # log pi, (N,)
        with reference_model(pl_module) as reference:
            if reference is not None:
                ratios = ratios - log_ratios(reference, None, prompts, replies, pad)
        rewards = (beta * ratios).tolist()
    models = [model for model, (_, c_ids) in sampled.items() for _ in c_ids]
    per_model = len(prompt_ids) * sampling.n_samples
    return [
        {"prompt": (i % per_model) // sampling.n_samples, "model": model, "reply": text,
         "reward": reward, "tokens": len(ids)}
        for i, (model, text, reward, ids) in enumerate(
            zip(models, decode(tokenizer, replies), rewards, replies, strict=True)
        )
    ]  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table (TensorBoard renders a text summary as Markdown)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:+.3f}"
        text = "" if value is None else str(value)
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| prompt | model | reply | reward |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(cell(r[c]) for c in COLUMNS[1:5])} |" for r in rows]
    return "\n".join(lines)
