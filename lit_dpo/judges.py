"""Judges: what ranks the replies a policy samples in online DPO (`lit_dpo.online`).

A judge is any callable `(prompts, replies) -> one float per reply`, higher meaning better:
a prompt is the user's request as text, a reply the sampled text. From Python a plain function
will do; a config names a `Judge` subclass by `class_path`. Built in:

- `RewardModelJudge`: an explicit reward model, either a `lit_dpo.reward_model.RewardModule`
  (Bradley-Terry, trained here) or any `AutoModelForSequenceClassification` (a path, a hub id or
  the model object);
- `ImplicitRewardJudge`: a DPO policy's implicit reward beta * (log pi - log pi_ref) against its
  reference (DPO paper, Eq. 5; `lit_dpo.reward.implicit_reward`).

A task's own ground truth (e.g. the sentiment experiment's VADER score,
`experiments.sentiment.VaderJudge`) is a `Judge` of its own, outside the core.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_dpo.utils import eval_mode, model_device

JudgeFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class Judge:
    """The interface: `judge(prompts, replies)` gives one float per reply, higher is better.

    Subclass it (so that a config can name it by `class_path`), or pass any callable with that
    signature from Python. A judge may hold a model: `to(device)` is called once training starts
    with the device the policy runs on (each rank's own under DDP)."""

    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> Sequence[float]:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Judge:
        return self

    def describe(self) -> str:
        """What a checkpoint records of the judge: resuming with another one is refused."""
        return type(self).__qualname__


def describe_judge(judge: JudgeFn) -> str:
    """A judge's `describe()`, or a plain callable's qualified name."""
    if isinstance(judge, Judge):
        return judge.describe()
    return getattr(judge, "__qualname__", type(judge).__qualname__)


def judge_scores(judge: JudgeFn, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
    """Call `judge` and check its answer: one finite number per reply, as floats."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    scores = judge(list(prompts), list(replies))
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().flatten().tolist()
    scores = [float(s) for s in scores]
    if len(scores) != len(replies):
        raise ValueError(
            f"the judge {describe_judge(judge)} gave {len(scores)} scores for "
            f"{len(replies)} replies: it must give one per reply"
        )
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(
            f"the judge {describe_judge(judge)} gave a non-finite score ({scores[bad[0]]}) to "
            f"reply {bad[0]}: {replies[bad[0]]!r}"
        )
    return scores


def _as_user(prompt: str, chat: bool) -> str | list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if chat else prompt


def _name(source) -> str | None:
    """A model as a judge's description names it: a path as given, an object described."""
    from lit_dpo.hub import describe

    return describe(source) if isinstance(source, nn.Module) else source


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No `datasets` progress bar for the few rows a judge tokenizes, every round."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


class RewardModelJudge(Judge):
    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        chat: bool | None = None,
        label: int | None = None,
        batch_size: PositiveInt = 16,
        trust_remote_code: bool = False,
    ):
        """An explicit reward model as the judge: r(x, y) of each (prompt, reply).

        Nothing is loaded until the first call (nor moved until `to`).

        Args:
            model: a `lit_dpo.reward_model.RewardModule` (its `score`; e.g. one trained, from
                `RewardModule.load_from_checkpoint`), or a sequence classifier: a hub id or path
                loaded with `AutoModelForSequenceClassification`, or the model.
            tokenizer: the model's tokenizer (a name, a path or the object). None: the model's
                own (from its path).
            chat: score (prompt, reply) as a conversation rendered with the chat template (a
                user message, then the assistant's). None: when the tokenizer has a template.
                Without one, a sequence classifier reads them as a text pair
                (`tokenizer(prompt, reply)`) and a RewardModule as plain text, as it trains on
                string rows.
            label: which logit of a sequence classifier is the reward; None: it must have one.
            batch_size: sequences per forward pass.
            trust_remote_code: allow the model's repository to run its own code when loading.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.chat = chat
        self.label = label
        self.batch_size = batch_size
        self.trust_remote_code = trust_remote_code
        self.device: torch.device | str | None = None
        self._described = f"RewardModelJudge({_name(model)}, label={label})"  # as given

    def describe(self) -> str:
        return self._described

    def to(self, device: torch.device | str) -> RewardModelJudge:
        self.device = device
        if isinstance(self.model, nn.Module):
            self.model.to(device)
        return self

    def _load(self) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        from lit_dpo.hub import load_tokenizer, resolve

        if isinstance(self.model, str):
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(
                resolve(self.model), trust_remote_code=self.trust_remote_code
            ).requires_grad_(False)
            if self.device is not None:
                self.model.to(self.device)
        if self.tokenizer is None:
            model = self.model
            path = getattr(model, "model_path", None) or getattr(model, "name_or_path", "")
            if not path:
                raise ValueError("RewardModelJudge: the model names no tokenizer: pass `tokenizer`")
            self.tokenizer = path
        if isinstance(self.tokenizer, str):
            self.tokenizer = load_tokenizer(self.tokenizer, self.trust_remote_code)
        return self.model, self.tokenizer

    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        from lit_dpo.reward_model import RewardModule

        model, tokenizer = self._load()
        chat = self.chat if self.chat is not None else tokenizer.chat_template is not None
        if isinstance(model, RewardModule):
            asked = [_as_user(p, chat) for p in prompts]
            with _quiet():
                return model.score(asked, list(replies), tokenizer, self.batch_size).tolist()
        if chat:
            texts = [
                tokenizer.apply_chat_template(
                    [*_as_user(p, True), {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, replies, strict=True)
            ]
            pairs: tuple = (texts,)
        else:
            pairs = (list(prompts), list(replies))
        out = []
        size = self.batch_size if tokenizer.pad_token is not None else 1  # nothing to pad with
        with eval_mode(model):
            for i in range(0, len(replies), size):
                batch = [column[i : i + size] for column in pairs]
                # chat text already holds its special tokens
                inputs = tokenizer(*batch, padding=True, add_special_tokens=not chat,
                                   return_tensors="pt")  # fmt: skip
                logits = model(**inputs.to(model_device(model))).logits.float()  # (n, labels)
                if self.label is None and logits.shape[-1] != 1:
                    raise ValueError(
                        f"RewardModelJudge: the model gives {logits.shape[-1]} logits per "
                        "sequence: say which is the reward with `label`"
                    )
                out += logits[:, self.label or 0].cpu().tolist()
        return out


class ImplicitRewardJudge(Judge):
    def __init__(
        self,
        policy: str | nn.Module,
        reference: str | nn.Module | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        beta: PositiveFloat = 1.0,
        chat: bool = True,
        batch_size: PositiveInt = 16,
    ):
        """A DPO policy's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) as the judge
        (`lit_dpo.reward.implicit_reward`): e.g. a policy trained offline judging the samples
        of another. Models given by name are loaded (as causal LMs) on the first call.

        Args:
            policy: the DPO-trained policy: a path, a hub id or the model.
            reference: its reference; None: reference-free (log pi_ref = 0).
            tokenizer: the tokenizer they were trained with; None: the policy's own.
            beta: the beta the policy was trained with (it only scales the scores).
            chat: each (prompt, reply) as a conversation with the chat template, as online DPO
                trains on them; False: plain text, as DPO trains on string rows.
            batch_size: rows per forward pass.
        """
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.beta, self.chat, self.batch_size = beta, chat, batch_size
        self._described = f"ImplicitRewardJudge({_name(policy)}, {_name(reference)}, {beta})"

    @classmethod
    def from_module(cls, module, tokenizer, **kwargs) -> ImplicitRewardJudge:
        """The judge of a trained `DPOModule`: its policy, reference and beta."""
        if getattr(module, "reference_mode", None) in ("adapter", "precomputed"):
            raise ValueError(
                f"ImplicitRewardJudge needs the reference as a network, not {module.reference_mode}"
                ": export the policy and pass the policy and reference models"
            )
        beta = kwargs.pop("beta", module.hparams.beta)
        return cls(module.policy, module.reference, tokenizer, beta=beta, **kwargs)

    def describe(self) -> str:
        return self._described

    def to(self, device: torch.device | str) -> ImplicitRewardJudge:
        self._load()
        for model in (self.policy, self.reference):
            if model is not None:
                model.to(device)
        return self

    def _load(self) -> None:
        from lit_dpo.hub import load_tokenizer, resolve

        def load(source):
            if not isinstance(source, str):
                return source
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(resolve(source)).requires_grad_(False)

        if self.tokenizer is None:
            self.tokenizer = self.policy if isinstance(self.policy, str) else None
            self.tokenizer = self.tokenizer or getattr(self.policy, "name_or_path", None)
            if not self.tokenizer:
                raise ValueError("ImplicitRewardJudge: the policy names no tokenizer: pass one")
        if isinstance(self.tokenizer, str):
            self.tokenizer = load_tokenizer(self.tokenizer)
        self.policy, self.reference = load(self.policy), load(self.reference)

    def __call__(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        from lit_dpo.reward import implicit_reward

        self._load()
        asked = [_as_user(p, self.chat) for p in prompts]
        with _quiet():
            rewards = implicit_reward(
                self.policy, self.reference, self.tokenizer, asked, list(replies), self.beta,
                self.batch_size,
            )  # fmt: skip
        return rewards.float().tolist()
