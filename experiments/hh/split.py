"""A fixed train / validation / test split of Anthropic HH harmless-base, by a hash of each row.

Each published line goes, byte for byte, to the split that the SHA-256 of its key picks, so the
split never depends on the order of the rows, on a seed or on the machine. The key is the
conversation's first Human turn (the text of `chosen` up to its first "\\n\\nAssistant:"):
identical rows share it, and so do the conversations that open with the same request (264 rows
of the 2,312 share an opening with another), so no opening request is in two splits.

    python -m experiments.hh split    # writes data/hh-rlhf/harmless-base/split/*.jsonl.gz
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

from lit_dpo.utils import atomic_write

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
SPLIT_DIR = SOURCE.parent / "split"
SPLITS = ("train", "validation", "test")
TEST_FRACTION, VAL_FRACTION = 0.2, 0.05
_TURN = "\n\nAssistant:"


def split_key(row: dict) -> str:
    """What decides a row's split: its first Human turn (the whole pair if it has none)."""
    chosen = row["chosen"]
    if _TURN in chosen:
        return chosen[: chosen.index(_TURN)]
    return chosen + "\0" + row["rejected"]


def assign(row: dict, test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION):
    """The split of one row: the first 64 bits of SHA-256(key) as a number u in [0, 1); test
    below `test_fraction`, validation below `test_fraction + val_fraction`, else train."""
    digest = hashlib.sha256(split_key(row).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + val_fraction else "train"


def split_lines(lines, test_fraction=TEST_FRACTION, val_fraction=VAL_FRACTION):
    """{split: the lines (bytes, unchanged) that go to it, in their order of arrival}."""
    out: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    for line in lines:
        if line.strip():
            out[assign(json.loads(line), test_fraction, val_fraction)].append(line.rstrip(b"\n"))
    return out


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no name and no timestamp in its header: the same bytes on every run."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buffer.getvalue()


def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """The first `limit` rows (None: all) of a JSON Lines file, gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def split(
    source: str = str(SOURCE),
    out_dir: str = str(SPLIT_DIR),
    test_fraction: float = TEST_FRACTION,
    val_fraction: float = VAL_FRACTION,
) -> dict[str, int]:
    """Write `train.jsonl.gz`, `validation.jsonl.gz` and `test.jsonl.gz` to `out_dir`: the
    published lines of `source`, unchanged and in their order, each in the split the hash of its
    first Human turn picks (see `assign`). Returns the number of rows per split.

    Args:
        source: the published file (`chosen`/`rejected` rows, JSON Lines, gzipped or not).
        out_dir: where the three split files go (a PreferenceDataModule reads the directory).
        test_fraction: the share of the hash range that goes to test.
        val_fraction: the share that goes to validation.
    """
    opener = gzip.open if str(source).endswith(".gz") else open
    with opener(source, "rb") as f:
        parts = split_lines(f, test_fraction, val_fraction)
    for name, lines in parts.items():
        data = b"".join(line + b"\n" for line in lines)
        atomic_write(Path(out_dir) / f"{name}.jsonl.gz", gzip_bytes(data))
    counts = {name: len(lines) for name, lines in parts.items()}
    print(f"{source} -> {out_dir}: {counts}")
    return counts
