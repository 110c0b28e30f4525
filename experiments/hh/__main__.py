"""`python -m experiments.hh {split,run,report} [--help]`: the HH split, the experiment, its
report (each subcommand's `--help` is its function's docstring)."""

from jsonargparse import CLI

from experiments.hh.results import report
from experiments.hh.run import run
from experiments.hh.split import split
from lit_dpo.cli import quiet_known_noise

quiet_known_noise()  # the library warnings a `lit-dpo` run filters, filtered here too
CLI([split, run, report], prog="python -m experiments.hh", as_positional=False)
