"""SFTModule: supervised fine-tuning on completion tokens, the stage before DPO and the paper's
"Preferred-FT" baseline (SFT on the chosen completions of preference pairs)."""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_dpo.logps import IGNORE_INDEX, sequence_logps
from lit_dpo.policy import PolicyModule
from lit_dpo.utils import STAGES


class SFTModule(PolicyModule):
    packing_refusal = "SFTModule takes padded batches only"  # PreferenceDataModule reads it

    def __init__(self, *args, **kwargs):
        """Supervised fine-tuning of a causal LM on the completion tokens of collated batches.

        Takes the arguments of `PolicyModule` (the model's path or model object, optimizer,
        scheduler, LoRA, precision and memory settings).

        It consumes PreferenceDataModule batches (2B, T) and trains on rows 0..B-1 only, the
        chosen completions (for `prompt`/`completion` rows chosen = rejected = completion), cut
        from the batch before the forward pass. The loss is the token-level mean NLL: summed over
        every completion token of the batch (EOS included), divided by their count, so long
        completions weigh more than short ones (not a mean of per-sequence means).
        """
        super().__init__(*args, **kwargs)
        self.metrics = nn.ModuleDict(
            {f"{stage}_loss": MeanMetric(dist_sync_on_step=stage == "train") for stage in STAGES}
        )

    def configure_model(self) -> None:
        """Build the model here, not in __init__ (see DPOModule.configure_model)."""
        if self.policy is None:
            self.policy = self.wrap_policy(self.load_policy())

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(summed NLL over the chosen rows' completion tokens, their token count)."""
        if "row_ids" in batch:
            raise ValueError("SFTModule takes padded batches only: set data.packing to false")
        n = batch["input_ids"].shape[0] // 2
        chosen = {k: v[:n] for k, v in batch.items()}  # (B, T): the rejected half never runs
        logps = sequence_logps(self.policy, chosen, self.hparams.logps_chunk_size)
        n_tokens = (chosen["labels"][:, 1:] != IGNORE_INDEX).sum()
        return -logps.sum.sum(), n_tokens

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        nll, n_tokens = self(batch)
        loss = nll / n_tokens  # token-level mean over the batch
        metric = self.metrics[f"{stage}_loss"]
        # Weighted by tokens, so the epoch value of val/loss is the token-level mean too.
        metric(loss.detach(), weight=n_tokens)
        self.log(
            f"{stage}/loss",
            metric,
            on_step=stage == "train",
            on_epoch=stage != "train",
            prog_bar=True,
            batch_size=batch["input_ids"].shape[0] // 2,
        )
        return loss
