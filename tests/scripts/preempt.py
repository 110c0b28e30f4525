"""A preemption as a scheduler deals it, for test_preemption.py.

`SigtermAt`: a callback a `lit-dpo` command line can add (with this directory on PYTHONPATH,
`--trainer.callbacks+=preempt.SigtermAt --trainer.callbacks.step 3`): when step `step` starts in
a run that did not resume, rank 0 sends a real SIGTERM, to itself (`kill PID`, `docker stop`) or
to its whole process group (`group: true`: SLURM, a terminal's Ctrl-\\ style broadcast).

As a script: `lit-dpo` itself (lit_dpo.cli.main), each process of it writing its exit status to
`$EXIT_DIR/rank<R>` (under DDP every rank runs this script anew; rank 0's parent sees only rank 0).

Usage: EXIT_DIR=DIR python preempt.py fit --config ... [--trainer.callbacks+=preempt.SigtermAt]
"""

import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SigtermAt(Callback):
    def __init__(self, step: int = 3, group: bool = False):
        self.step, self.group = step, group

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        resumed = trainer.ckpt_path is not None
        if trainer.global_step == self.step and trainer.is_global_zero and not resumed:
            if self.group:
                os.killpg(os.getpgid(0), signal.SIGTERM)
            else:
                os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    from lit_dpo.cli import main

    code = 1  # an exception other than SystemExit ends the process with 1
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        raise
    finally:
        rank = os.environ.get("LOCAL_RANK", "0")  # set by Lightning for the ranks it starts
        Path(os.environ["EXIT_DIR"], f"rank{rank}").write_text(str(code))
