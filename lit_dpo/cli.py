"""`lit-dpo`: a thin LightningCLI over DPOModule and PreferenceDataModule.

lit-dpo fit --config configs/sentiment-smollm2.yaml
lit-dpo fit --config configs/tiny.yaml --model.beta 0.5 --print_config
lit-dpo export --ckpt_path runs/x/checkpoints/last.ckpt --output_dir runs/x/hf
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from lit_dpo.callbacks import InterruptCheckpoint
from lit_dpo.data import PreferenceDataModule
from lit_dpo.export import HFExport, export_checkpoint
from lit_dpo.module import DPOModule


class DPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenized with the policy's own tokenizer.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        # Always on: the trained policy is written in Hugging Face format when fit ends.
        parser.add_lightning_class_args(HFExport, "export")


def main(args: list[str] | None = None) -> None:
    """Entry point; `args` (default: the command line) lets tests and notebooks call it."""
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["export"]:  # a tool, not a Trainer run
            from jsonargparse import auto_cli

            auto_cli({"export": export_checkpoint}, args=argv)
            return
        DPOCLI(
            DPOModule,
            PreferenceDataModule,
            args=args,
            # Rerunning a config into the same directory replaces its saved config.yaml.
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the module builds them over trainable params
            trainer_defaults={"callbacks": [InterruptCheckpoint()]},  # added to the config's
        )
    except (FileNotFoundError, ValueError, FloatingPointError) as err:
        # Bad input (a missing file, an unknown loss, a malformed row) is the user's to fix, and a
        # non-finite loss names its step and saved batch: one clear line, no traceback.
        # LIT_DPO_DEBUG=1 shows it.
        if os.environ.get("LIT_DPO_DEBUG"):
            raise
        sys.exit(f"lit-dpo: error: {err}")


if __name__ == "__main__":
    main()
