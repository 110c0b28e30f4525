"""`python -m experiments.sentiment --out_dir data/sentiment --n_prompts 200 --seed 0`: build the
preference pairs (see `experiments.sentiment.pairs.build_pairs`, whose docstring is `--help`)."""

from jsonargparse import CLI

from experiments.sentiment.pairs import build_pairs
from lit_dpo.utils import finite_json

print(finite_json(CLI(build_pairs, prog="python -m experiments.sentiment")))
