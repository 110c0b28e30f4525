"""`python -m experiments.hh {split,run,report} [--help]`: the HH split, the experiment, its
report (each subcommand's `--help` is its function's docstring)."""

from jsonargparse import CLI

from experiments.hh.results import report
from experiments.hh.run import run
from experiments.hh.split import split

CLI([split, run, report], prog="python -m experiments.hh", as_positional=False)
