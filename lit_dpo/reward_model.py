"""RewardModule: an explicit Bradley-Terry reward model, the baseline that DPO's implicit reward
("your language model is secretly a reward model") is measured against.

A causal-LM backbone, loaded as PolicyModule loads a policy (a name, a path or a model object;
LoRA, dtype, attention, checkpointing), with a scalar head on the hidden state of each sequence's
last real token (the EOS that ends the reply), trained on the same PreferenceDataModule batches as
DPO with the Bradley-Terry negative log-likelihood (DPO paper, Eq. 2):

    loss = -log sigma(r(x, y_c) - r(x, y_r))

`score` gives r(x, y) of (prompt, reply) pairs, e.g. to evaluate or to judge samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_dpo.data import collate_sequences
from lit_dpo.policy import PolicyModule
from lit_dpo.utils import STAGES, eval_mode, model_device, pad_token_id, pairwise_accuracy

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class _LastTokenHead(nn.Module):
    """Stands in for the LM head during one forward pass (as `lit_dpo.logps` swaps in its
    completion head): the scalar head on each row's last real token; no logits are made."""

    def __init__(self, head: nn.Linear, last: Tensor):
        super().__init__()
        self.head, self.last = head, last
        self.result: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        rows = torch.arange(len(hidden), device=hidden.device)
        h = hidden[rows, self.last.to(hidden.device)]  # (N, H): each row's last real token
        self.result = self.head(h.to(self.head.weight.dtype)).squeeze(-1)  # (N,)
        return hidden[:, :0]  # (N, 0, H): what the model returns as `logits`


def last_token_rewards(model: nn.Module, head: nn.Linear, batch: dict[str, Tensor]) -> Tensor:
    """r per row of a padded batch, (N,): `head` on the final hidden state of the last position
    where `attention_mask` is 1 (right or left padding alike). The model's own forward runs with
    its LM head swapped for the scalar head, so wrappers' hooks (PEFT, FSDP2) stay in play."""
    ids = batch["input_ids"]  # (N, T)
    mask = batch.get("attention_mask")
    if mask is None:
        last = torch.full((len(ids),), ids.shape[1] - 1, dtype=torch.long)
    else:
        last = ids.shape[1] - 1 - mask.flip(1).argmax(1)  # (N,): the last 1 of each row
    lm_head = model.get_output_embeddings()
    scorer = _LastTokenHead(head, last)
    model.set_output_embeddings(scorer)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        model.set_output_embeddings(lm_head)
    return scorer.result


def bradley_terry(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Per-pair loss -log sigma(r_c - r_r), (B,) (DPO paper, Eq. 2)."""
    return -F.logsigmoid(chosen - rejected)


class RewardModule(PolicyModule):
    packing_refusal = "RewardModule takes padded batches only"  # PreferenceDataModule reads it

    def __init__(self, *args, **kwargs):
        """A Bradley-Terry reward model: a causal-LM backbone plus a scalar head.

        Takes the arguments of `PolicyModule` (the backbone's path or model object, optimizer,
        scheduler, LoRA, precision and memory settings); the optimizer is built over the
        backbone's trainable parameters and the head's. The backbone is held as `policy`, the
        head (`Linear(hidden_size, 1)`, built in `configure_model`) as `head`. The head starts at
        zero, so every reward is 0 at step 0 and the loss is exactly ln 2, as DPO's is.

        It consumes PreferenceDataModule batches (2B, T), padded (rows 0..B-1 prompt+chosen,
        B..2B-1 prompt+rejected, with `attention_mask`), and logs `{stage}/loss`,
        `{stage}/rewards/chosen`, `rejected`, `margins` (r_c - r_r) and `accuracies` (a tie
        counts half), as DPOModule names them.
        """
        super().__init__(*args, **kwargs)
        self.head: nn.Linear | None = None
        self.metrics = nn.ModuleDict(
            {
                _key(f"{stage}/{m}"): MeanMetric(dist_sync_on_step=stage == "train")
                for stage in STAGES
                for m in METRICS
            }
        )
        self._tokenizer = None  # the backbone's own, loaded by `score` when none is given

    @property
    def backbone(self) -> nn.Module | None:
        return self.policy

    def configure_model(self) -> None:
        """Build the backbone and the head here, not in __init__ (see DPOModule.configure_model)."""
        if self.policy is not None:
            return
        backbone = self.load_policy()
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.policy = self.wrap_policy(backbone)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """r of every row of a padded batch, (N,)."""
        if "row_ids" in batch:
            raise ValueError(f"{self.packing_refusal}: set data.packing to auto or false")
        return last_token_rewards(self.policy, self.head, batch)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        rewards = self(batch)  # (2B,)
        n = len(rewards) // 2
        chosen, rejected = rewards[:n], rewards[n:]
        losses = bradley_terry(chosen, rejected)  # (B,)
        margins = (chosen - rejected).detach()
        values = {
            "loss": losses.detach(),
            "rewards/chosen": chosen.detach(),
            "rewards/rejected": rejected.detach(),
            "rewards/margins": margins,
            "rewards/accuracies": pairwise_accuracy(margins),
        }
        for name, value in values.items():
            metric = self.metrics[_key(f"{stage}/{name}")]
            metric(value)
            self.log(
                f"{stage}/{name}",
                metric,
                on_step=stage == "train",
                on_epoch=stage != "train",
                prog_bar=name in ("loss", "rewards/accuracies"),
                batch_size=n,
            )
        return losses.mean()

    def trainable(self) -> list[nn.Parameter]:
        return super().trainable() + [p for p in self.head.parameters() if p.requires_grad]

    def objective(self) -> dict:
        return super().objective() | {"head": "linear on the last real token"}

    # -- scoring -------------------------------------------------------------------------------

    def score_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        reply_ids: Sequence[Sequence[int]],
        pad_token_id: int,
        batch_size: int = 16,
    ) -> Tensor:
        """r(x, y) of already tokenized (prompt, reply) sequences, (N,) float32 on the CPU, in
        eval mode under no_grad (the modules' modes are given back)."""
        if self.policy is None:
            self.configure_model()
        sequences = list(zip(prompt_ids, reply_ids, strict=True))
        out = []
        with eval_mode(self.policy, self.head):
            for i in range(0, len(sequences), batch_size):
                batch = collate_sequences(sequences[i : i + batch_size], pad_token_id)  # (n, T)
                batch = {k: v.to(model_device(self.policy)) for k, v in batch.items()}
                out.append(self(batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(
        self,
        prompts: Sequence[str | list[dict[str, str]]],
        replies: Sequence[str | list[dict[str, str]]],
        tokenizer=None,
        batch_size: int = 16,
    ) -> Tensor:
        """The reward r(x, y) of each (prompt, reply), (N,) float32 on the CPU.

        Tokenized as `lit_dpo.reward.tokenize_responses` tokenizes them, i.e. as
        PreferenceDataModule tokenizes a row of the same kind (strings as plain text; message
        lists with the chat template), whole (never truncated). `tokenizer` None: the
        backbone's own (from `model_name_or_path`). Rewards compare replies to the same prompt.
        """
        from lit_dpo.hub import load_tokenizer
        from lit_dpo.reward import tokenize_responses

        if tokenizer is None:
            if self._tokenizer is None:
                if self.model_path is None:
                    raise ValueError("the backbone names no tokenizer: pass `tokenizer`")
                self._tokenizer = load_tokenizer(self.model_path, self.hparams.trust_remote_code)
            tokenizer = self._tokenizer
        prompt_ids, reply_ids = tokenize_responses(tokenizer, prompts, replies)
        return self.score_ids(prompt_ids, reply_ids, pad_token_id(tokenizer), batch_size)


def _key(metric_name: str) -> str:
    """Module names may not contain '/' or '.'."""
    return metric_name.replace("/", "_")
