"""What the `lit-dpo` command always adds to a run: a checkpoint when the run is stopped (Ctrl-C,
SIGTERM), checkpoint files that are whole or absent, and a terminal that shows the run (a progress
bar in steps, a short model summary)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_dpo.utils import atomic_file

SIGTERM_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class InterruptCheckpoint(Callback):
    """When `fit` is stopped by Ctrl-C or SIGTERM (a scheduler's preemption, `docker stop`,
    `kill PID`), save a checkpoint, so that `--ckpt_path last` (or `--ckpt_path <it>`) resumes
    where the run stopped instead of at the last periodic checkpoint.

    SIGTERM ends the run after the current training step, on every rank after the same one,
    and the process exits with status 143 (128 + SIGTERM): Lightning alone exits 0, and a
    scheduler would believe the job finished.

    Args:
        filename: written beside the run's other checkpoints (the ModelCheckpoint's directory,
            else `<log_dir>/checkpoints`).
    """

    def __init__(self, filename: str = "interrupted.ckpt"):
        self.filename = filename
        self._sigterm = False  # this process received SIGTERM during fit
        self._trainer: L.Trainer | None = None

    def path(self, trainer: L.Trainer) -> str:
        """Where the checkpoint goes (under DDP every rank must call this: it may broadcast)."""
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
            return os.path.join(ckpt.dirpath, self.filename)
        return os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints", self.filename
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sigterm = False

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_sigterm(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_sigterm(trainer)

    def _take_sigterm(self, trainer: L.Trainer) -> None:
        # Lightning (2.6) has just installed its SIGTERM handler, which broadcasts from inside
        # the handler: under DDP that collective pairs with whatever the other rank runs next,
        # and gloo aborts ("Received data size doesn't match"). Ours only takes note; the ranks
        # agree in on_train_batch_end. Lightning's teardown restores the previous handler.
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame) -> None:
        launcher = self._trainer.strategy.launcher if self._trainer else None
        if not self._sigterm and launcher is not None:
            launcher.kill(signum)  # the ranks this process started, as Lightning does
        self._sigterm = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        # One collective per step, on every rank at the same point: stop if any rank was told to.
        if trainer.strategy.reduce_boolean_decision(self._sigterm, all=False):
            # Lightning's own flag: its loop raises SIGTERMException once this step is complete.
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if isinstance(exception, SIGTERMException):
            exception.code = SIGTERM_EXIT  # a SystemExit: this is the status the process ends with
        elif not isinstance(exception, KeyboardInterrupt):
            return
        if trainer.state.fn != "fit":
            return
        path = self.path(trainer)
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
        how = "SIGTERM" if isinstance(exception, SIGTERMException) else "Interrupted"
        rank_zero_info(
            f"{how} at step {trainer.global_step}: saved {path} (--ckpt_path last resumes)"
        )


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); nothing was left under its name."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files that are whole or absent, never cut short under their final name.

    Each checkpoint is written to a temporary file in its own directory, synced to disk, then
    renamed to its name (`os.replace`, atomic within one filesystem). Lightning's own save
    (2.6, through fsspec) writes the temporary file in the system temp directory and moves it:
    when the run directory is on another filesystem, that move is a copy into the final name,
    and a full disk leaves a partial `epoch=0-step=2.ckpt` that looks complete.
    Remote paths (s3://, ...) are left to Lightning.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            with atomic_file(path) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as err:  # torch wraps the OSError of a write
            cause = next((e for e in _chain(err) if isinstance(e, OSError)), err)
            raise CheckpointWriteError(
                f"could not write the checkpoint {path}: {cause} (no file left under that name)"
            ) from err


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


# The progress bar's short names for the last part of a metric's name (`train/rewards/margins`),
# shown in this order before any other.
SHORT_NAMES = {"loss": "loss", "accuracies": "acc", "margins": "margin"}


def short_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """`{"train/loss": .., "train/rewards/margins": ..}` -> `{"loss": .., "margin": ..}`: the
    last part of each name, shortened by SHORT_NAMES (and shown in its order); a name two
    metrics would share stays whole."""
    short = {key: key.rsplit("/", 1)[-1] for key in metrics}
    order = {name: i for i, name in enumerate(SHORT_NAMES)}
    keys = sorted(metrics, key=lambda k: order.get(short[k], len(order)))  # stable
    taken = [SHORT_NAMES.get(name, name) for name in short.values()]
    out = {}
    for key in keys:
        name = SHORT_NAMES.get(short[key], short[key])
        out[name if taken.count(name) == 1 else key] = metrics[key]
    return out


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, for runs counted in steps, within 80 columns.

    With `max_steps` set, one bar spans the run: `step N/max_steps` (optimizer steps: a resumed run
    starts where it stopped), not the batches of an epoch that never ends. The training metrics
    are shown under short names (`loss`, `acc`, `margin`); after each validation one line of its
    metrics (`step 50: val loss 0.612, acc 0.683, margin 0.214`) stays above the bar. Without
    `max_steps`, the bar counts each epoch's batches, as Lightning's does.
    """

    STEP_FORMAT = "step {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}{postfix}"

    def _by_step(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps > 0

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        if self._by_step(self.trainer):  # once per fit: the bar goes on across epochs
            bar.bar_format = self.STEP_FORMAT
            bar.reset(total=self.trainer.max_steps)
            bar.initial = bar.n = self.trainer.global_step  # resumed: the rate counts from here
        return bar

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._by_step(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self._by_step(trainer):  # else the one bar stays open (even with `leave`)
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._by_step(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar.n != step and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.is_disabled:
            return
        val = {k: v for k, v in trainer.progress_bar_metrics.items() if k.startswith("val/")}
        if val:
            values = ", ".join(f"{k} {v:.3f}" for k, v in short_names(val).items())
            self.train_progress_bar.write(f"step {trainer.global_step}: val {values}")

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict[str, Any]:
        # Validation and test numbers have their own line; `v_num` is in the log directory's name.
        metrics = super().get_metrics(trainer, pl_module)
        drop = ("v_num", "val/", "test/")
        return short_names({k: v for k, v in metrics.items() if not k.startswith(drop)})


class ParamSummary(ModelSummary):
    """Lightning's model summary, short: one row per top-level module (name, type, parameters,
    train or eval mode) and the totals, without the FLOPs (0 for a model Lightning does not trace)
    or the count of modules in each mode."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )

        columns = [(name, values) for name, values in summary_data if name in _SUMMARY_COLUMNS]
        widths = [max(map(len, [name, *values])) for name, values in columns]
        rows = zip(*(values for _, values in columns), strict=True)
        lines = [
            " | ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [[name for name, _ in columns], *rows]
        ]
        count = get_human_readable_count
        frozen = total_parameters - trainable_parameters
        lines.append(
            f"{count(trainable_parameters)} trainable, {count(frozen)} frozen parameters "
            f"({get_formatted_model_size(model_size)} MB)"
        )
        rank_zero_info("\n".join(lines))


_SUMMARY_COLUMNS = (" ", "Name", "Type", "Params", "Mode")
