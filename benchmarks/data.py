"""Synthetic preference pairs made of real English, offline and deterministic from a seed.

The text is prose from the docstrings of Python's standard library (what `help()` shows), so a
benchmark tokenizes words a tokenizer was built for, not random ids. Prompt and completion lengths
are drawn log-uniformly over a wide range so that padding to the longest row of a batch costs what
it costs on real data. Every row fits `max_length` as is: no system truncates, so every system
trains on exactly the same tokens.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import random
import re
import warnings
from pathlib import Path

# Modules whose docstrings are mostly prose (sorted, so the corpus is fixed for a Python version).
MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "email", "enum", "fractions", "functools", "heapq", "http.client",
    "inspect", "io", "itertools", "json", "logging", "os", "pathlib", "pickle", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "uuid", "warnings", "zipfile",
)  # fmt: skip
_PROSE = re.compile(r"[A-Za-z][A-Za-z ,.;:'()\-]+")


def english_words() -> list[str]:
    """The words of every prose paragraph in the docstrings of `MODULES` and their members."""
    words = []
    with warnings.catch_warnings():  # deprecated members warn when touched
        warnings.simplefilter("ignore")
        for name in MODULES:
            module = importlib.import_module(name)
            for _, obj in sorted(inspect.getmembers(module), key=lambda m: m[0]):
                for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                    text = " ".join(paragraph.split())
                    # prose only: no doctests, no tables, no code; a sentence or more
                    if len(text) > 60 and _PROSE.fullmatch(text) and text.count(" ") > 8:
                        words += text.split()
    return words


def make_pairs(
    tokenizer,
    n_pairs: int,
    max_length: int,
    seed: int = 0,
    prompt_tokens: tuple[int, int] = (16, 96),
    completion_tokens: tuple[int, int] = (8, 96),
) -> list[dict[str, str]]:
    """`n_pairs` rows {prompt, chosen, rejected}; each prompt + completion + EOS fits `max_length`.

    Lengths are drawn log-uniformly in tokens of `tokenizer` (a prompt over `prompt_tokens`, each
    completion over `completion_tokens`, capped by the room the prompt leaves). Chosen and
    rejected are different passages.
    """
    rng = random.Random(seed)
    words = english_words()

    def n_tokens(text: str, specials: bool = False) -> int:
        return len(tokenizer(text, add_special_tokens=specials)["input_ids"])

    def passage(budget: int, prefix: str = "", specials: bool = False) -> str:
        """The longest run of words from a random place whose text fits `budget` tokens."""
        start = rng.randrange(len(words) - budget)
        while n_tokens(prefix + words[start], specials) > budget:  # a long word, few tokens left
            start = rng.randrange(len(words) - budget)
        lo, hi = 1, budget  # a word is at least one token: `budget` words is an upper bound
        while lo < hi:
            mid = (lo + hi + 1) // 2
            text = prefix + " ".join(words[start : start + mid])
            lo, hi = (mid, hi) if n_tokens(text, specials) <= budget else (lo, mid - 1)
        return prefix + " ".join(words[start : start + lo])

    def log_uniform(lo: int, hi: int) -> int:
        return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    rows = []
    for _ in range(n_pairs):
        longest_prompt = max_length - 1 - completion_tokens[0]  # leave room for EOS
        prompt = passage(min(log_uniform(*prompt_tokens), longest_prompt), "Explain: ", True)
        room = max_length - n_tokens(prompt, specials=True) - 1  # minus EOS
        chosen = rejected = ""
        while chosen == rejected:
            chosen, rejected = (
                passage(min(log_uniform(*completion_tokens), room), "\n") for _ in range(2)
            )
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> str:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)
