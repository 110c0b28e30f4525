"""`lit-dpo`: a thin LightningCLI over DPOModule and PreferenceDataModule.

lit-dpo fit --config configs/sentiment-smollm2.yaml
lit-dpo fit --config configs/tiny.yaml --model.beta 0.5 --print_config
lit-dpo fit --config configs/tiny.yaml --ckpt_path last   # after a preemption: resume
lit-dpo validate --config configs/tiny.yaml --ckpt_path last \
    --trainer.callbacks+=lit_dpo.samples.SampleReplies --trainer.callbacks.prompts prompts.txt
lit-dpo export --ckpt_path runs/x/checkpoints/last.ckpt --output_dir runs/x/hf

Subcommands: fit, validate, test (Lightning's) and export (a tool); Lightning's `predict` is left
out: DPO has no batch prediction, and replies to prompts are what SampleReplies writes, in
`validate` as in `fit`.

Each run writes into a `lightning_logs/version_N` of its own, even when several start at once
into one `default_root_dir`; `--ckpt_path last` resumes from the newest checkpoint of those runs.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path

import lightning as L
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from lit_dpo.callbacks import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    InterruptCheckpoint,
    ParamSummary,
    StepProgressBar,
)
from lit_dpo.checkpoints import check_sharded
from lit_dpo.data import PreferenceDataModule
from lit_dpo.export import HFExport, export_checkpoint
from lit_dpo.module import DPOModule

# A parse error raises (one line in main) instead of printing the whole usage and exiting.
_SUBCOMMANDS = ("fit", "validate", "test")
_PARSER_KWARGS = {"exit_on_error": False} | {cmd: {"exit_on_error": False} for cmd in _SUBCOMMANDS}

# Known-benign warnings of the libraries under us, silenced by message and module; anything
# else still shows. (message regex, category, module regex)
BENIGN_WARNINGS = [
    # torchdata 0.11's StatefulDataLoader calls torch.set_vital, deprecated in torch 2.13.
    (r"'set_vital' is deprecated", UserWarning, r"torchdata\."),
    # Lightning 2.6's pytree helper builds torch's deprecated LeafSpec.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    # Without tensorboard, Lightning's default logger is CSVLogger, as it says at length.
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", UserWarning, r"lightning\."),
    # DPO's reference is frozen in eval mode on purpose (and the policy is put in train mode).
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning, r"lightning\."),
]


def _no_tips(record: logging.LogRecord) -> bool:
    """Lightning's advertisements ("💡 Tip: ... try installing litlogger") are not our run's."""
    return not str(record.msg).startswith("💡 Tip:")


def quiet_known_noise() -> None:
    """Filter BENIGN_WARNINGS and Lightning's tips (idempotent)."""
    for message, category, module in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_no_tips)


class DPOCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in _SUBCOMMANDS}

    def setup_parser(self, add_subcommands: bool, main_kwargs, subparser_kwargs) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # listed in `lit-dpo --help`; `main` runs it before any Trainer
            about = _first_sentence(export_checkpoint.__doc__)
            export = ArgumentParser(description=about)
            export.add_function_arguments(export_checkpoint)
            self.parser._subcommands_action.add_subcommand("export", export, help=about)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        # Always on: the trained policy is written in Hugging Face format when fit ends.
        parser.add_lightning_class_args(HFExport, "export")

    def before_instantiate_classes(self) -> None:
        # The data is tokenized with the policy's own tokenizer unless `data.tokenizer` names one.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.data.tokenizer is None:
            config.data.tokenizer = config.model.model_name_or_path
            config.data.tokenizer_revision = config.model.get("revision")

    def instantiate_trainer(self, **kwargs):
        """The Trainer, with our progress bar and model summary unless the config names its own
        (or turns them off)."""
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        for kind, default, flag in [
            (ProgressBar, StepProgressBar, "enable_progress_bar"),
            (ModelSummary, ParamSummary, "enable_model_summary"),
        ]:
            if trainer.get(flag) is not False and not any(isinstance(c, kind) for c in callbacks):
                callbacks = [*callbacks, default()]
                if kind is ModelSummary:  # else Lightning says it found ours, and skips its own
                    trainer[flag] = False
        trainer["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Nothing: LightningCLI (2.6) would replace the model's settings with those saved in a
        `--ckpt_path` file, silently dropping the ones this command gives (`--model.lora.r 4`
        resumed without LoRA). The run keeps its own; a checkpoint trained with other settings
        is refused when it loads, naming each difference."""

    def before_fit(self) -> None:
        trainer = self.trainer
        # Checkpoints whole or absent: Lightning's stock writer is replaced; a plugin the
        # config names is kept.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":  # before this run claims its (empty) directory
            config["ckpt_path"] = last_checkpoint(trainer)
        if config.get("ckpt_path") and os.path.isfile(config["ckpt_path"]):
            whole_checkpoint(config["ckpt_path"])
        elif config.get("ckpt_path") and os.path.isdir(config["ckpt_path"]):  # sharded
            check_sharded(config["ckpt_path"])
        if trainer.is_global_zero:  # the other ranks' log_dir is rank 0's (Lightning broadcasts)
            for logger in trainer.loggers:
                claim_version(logger)

    before_validate = before_test = before_predict = before_fit


def _auto_versioned(logger) -> bool:
    """A logger that would pick the next free `version_N` itself (Lightning's default logger)."""
    return isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger._version is None


def claim_version(logger) -> None:
    """Give an auto-versioned logger a `version_N` directory created here with `os.mkdir`,
    which exactly one process can do: runs started at the same moment into one root would
    otherwise each compute the same next N and share a directory."""
    if not _auto_versioned(logger):
        return
    root = Path(logger.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{n}").mkdir()
        except FileExistsError:  # another run took it first
            n += 1
            continue
        logger._version = n  # the loggers' own field: what `version=n` would have set
        return


def last_checkpoint(trainer: L.Trainer) -> str | None:
    """`--ckpt_path last`: the newest checkpoint (by modification time) of the runs under this
    root, including the one a SIGTERM or Ctrl-C saved. Every run logs into a `version_N` of
    its own, where Lightning's own "last" would look, and find nothing, on a rerun."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if _auto_versioned(logger):
        runs = [p for p in Path(logger.root_dir).glob("version_*") if p.is_dir()]
    else:
        runs = [Path(trainer.log_dir or trainer.default_root_dir)]
    dirs = {run / "checkpoints" for run in runs}
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            dirs.add(Path(cb.dirpath))
    found = [p for d in dirs for p in d.glob("*.ckpt")]
    found += Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")  # Lightning's SLURM requeue
    if not found:
        rank_zero_warn("--ckpt_path last: no checkpoint yet; training starts from the beginning")
        return None
    return str(max(found, key=lambda p: p.stat().st_mtime_ns))


def whole_checkpoint(path: str) -> None:
    """Refuse a checkpoint file cut short (a full disk, a copy interrupted): one line naming it,
    where loading it would fail deep inside torch.load. A checkpoint is a zip archive, whose
    directory is written last."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"--ckpt_path {path}: not a whole checkpoint (cut short or damaged); pass another"
            " (or move it away, and `--ckpt_path last` takes the newest one left)"
        )


def _negative_numbers(argv: list[str]) -> list[str]:
    """`--model.beta -1e-3` as `--model.beta=-1e-3`: argparse (Python < 3.13) takes a value that
    starts with '-' for an option unless it reads like -1 or -0.5, so -1e-3 and -inf failed
    with "expected one argument"."""
    out: list[str] = []
    for arg in argv:
        if out and re.fullmatch(r"--[\w.]+", out[-1]) and arg.startswith("-") and _is_float(arg):
            out[-1] += "=" + arg
        else:
            out.append(arg)
    return out


def _first_sentence(doc: str | None) -> str:
    """A docstring's first sentence on one line (`--help` lists each subcommand with it)."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s", paragraph)[0]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _one_line(err: ArgumentError) -> str:
    """jsonargparse's 'Parser key "model.beta":\\n  Not of type PositiveFloat: ...' on one line,
    led by the option it is about."""
    lines = [re.sub(r"^- ", "", line.strip()) for line in str(err).splitlines() if line.strip()]
    key = re.fullmatch(r'Parser key "(.+)":', lines[0])
    return f"--{key[1]}: " + "; ".join(lines[1:]) if key else "; ".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point; `args` (default: the command line) lets tests and notebooks call it."""
    if args is None:  # rewritten in place: DDP starts the other ranks with sys.argv
        sys.argv[1:] = _negative_numbers(sys.argv[1:])
    else:
        args = _negative_numbers(args)
    argv = sys.argv[1:] if args is None else args
    quiet_known_noise()
    try:
        if argv[:1] == ["export"]:  # a tool, not a Trainer run
            from jsonargparse import auto_cli

            auto_cli({"export": export_checkpoint}, args=argv, exit_on_error=False)
            return
        DPOCLI(
            DPOModule,
            PreferenceDataModule,
            args=args,
            parser_kwargs=_PARSER_KWARGS,
            # Rerunning a config into the same directory replaces its saved config.yaml.
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the module builds them over trainable params
            trainer_defaults={"callbacks": [InterruptCheckpoint()]},  # added to the config's
        )
    except ArgumentError as err:  # a value the parser refuses: usage errors exit 2
        if os.environ.get("LIT_DPO_DEBUG"):
            raise
        print(f"lit-dpo: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, ValueError, FloatingPointError, CheckpointWriteError) as err:
        # Bad input (a missing file, an unknown loss, a malformed row) is the user's to fix, and a
        # non-finite loss names its step and saved batch, a full disk the checkpoint it cut: one
        # clear line, no traceback. LIT_DPO_DEBUG=1 shows it.
        if os.environ.get("LIT_DPO_DEBUG"):
            raise
        sys.exit(f"lit-dpo: error: {err}")


if __name__ == "__main__":
    main()
