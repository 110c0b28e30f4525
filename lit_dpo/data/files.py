"""Data files read by us, where the loader cannot tell the user enough: which line of a file is
at fault and why, where each row of a file is, and a CSV file's columns.

`datasets` reads the files; these functions read them again to name lines, on failure paths
only (an error, a rejects file), except that a CSV file is checked before it is loaded (pandas
fills a record short of fields without a word). The ground floor of `lit_dpo.data`: imports
nothing from it.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import importlib.util
import io
import json
import lzma
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

SHOWN = 5  # bad rows (or lines) quoted one by one in an error; the rest are only counted
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Compressed JSON, JSON Lines and CSV files ("pairs.jsonl.gz", as Anthropic-HH is published;
# PKU-SafeRLHF's first release was .jsonl.xz), read as `datasets` reads them: suffix -> opener.
COMPRESSED = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
    ".zst": lambda path: io.BufferedReader(_zstandard().open(path, "rb")),  # lines, as others
}


def data_suffix(path: str | Path) -> str | None:
    """The suffix naming a file's format (".jsonl" also for "x.jsonl.gz"); None if unread."""
    suffixes = Path(path).suffixes[-2:]
    if suffixes[-1:] and suffixes[-1] in COMPRESSED and suffixes[0] != ".parquet":
        suffixes = suffixes[:1]
    return suffixes[-1] if suffixes and suffixes[-1] in BUILDERS else None


def open_bytes(path: str | Path) -> IO[bytes]:
    opener = COMPRESSED.get(Path(path).suffix, open)
    return opener(path, "rb") if opener is open else opener(path)


def codec_problem(path: str | Path) -> str | None:
    """Why a compressed file cannot be read here (its codec's package is missing); else None."""
    if Path(path).suffix == ".zst" and importlib.util.find_spec("zstandard") is None:
        return f"{path}: reading .zst files needs the zstandard package: pip install zstandard"
    return None


def _zstandard():
    import zstandard  # optional: only .zst files need it (see `codec_problem`)

    return zstandard


def is_json_array(path: str | Path) -> bool:
    """Whether a .json/.jsonl file holds one JSON array (the loader reads one, whatever the
    suffix)."""
    with open_bytes(path) as f:
        return f.read(4096).lstrip().removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def file_problem(path: str) -> str | None:
    """Why a data file cannot be read, naming the line (and field); None when no reason is found.

    Checks that the file has rows, is UTF-8 (JSON and CSV), that each line of JSON Lines (or the
    whole of a JSON array) parses to objects, and that no string holds a lone UTF-16 surrogate.
    """
    suffix = data_suffix(path)
    if suffix == ".parquet":
        return None  # pyarrow's own message names the problem; the caller adds the file
    with open_bytes(path) as f:
        head = f.read(4096).lstrip()
    if not head:
        return f"{path}: no rows (the file is empty)"
    if suffix == ".csv":
        with open_bytes(path) as f:
            problems = [
                f"line {number}: {problem}"
                for number, line in enumerate(f, 1)
                if (problem := line_problem(line, json_lines=False))
            ]
        problems = problems or csv_problems(path)
    else:
        problems = _array_problems(path) if is_json_array(path) else _json_lines_problems(path)
    if not problems:
        return None
    more = f"; ... {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    lines = f"{len(problems)} bad line{'' if len(problems) == 1 else 's'}"
    return f"{path}: {lines}: {'; '.join(problems[:SHOWN])}{more}"


def line_problem(line: bytes, json_lines: bool) -> str | None:
    """Why one line of a JSON Lines (or CSV) file cannot be read; None if it can."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1})"
    if not json_lines or not text.strip():  # the loader skips blank lines
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg}, column {err.colno})"
    if not isinstance(row, dict):
        return f"not a JSON object but {type(row).__name__}"
    return surrogate_problem(row)


def _json_lines_problems(path: str) -> list[str]:
    """The problems of a JSON Lines file, each naming its line. An object opened by a line of
    its own ("{", pretty-printed) is read to its end, and named by its first line."""
    problems, start, pending = [], 0, b""
    with open_bytes(path) as f:
        for number, line in enumerate(f, 1):
            if not pending and line.strip() != b"{":
                if problem := line_problem(line, json_lines=True):
                    problems.append(f"line {number}: {problem}")
                continue
            start, pending = start if pending else number, pending + line
            try:
                json.loads(pending)
            except ValueError:  # not closed yet (or broken: said at the end)
                continue
            if problem := line_problem(pending, json_lines=True):
                problems.append(f"line {start}: {problem}")
            pending = b""
    if pending:  # never closed: where the parser gave up
        try:
            json.loads(pending)
        except json.JSONDecodeError as err:
            line = start + err.lineno - 1
            problems.append(f"line {line}: not valid JSON ({err.msg}, column {err.colno})")
        except UnicodeDecodeError:
            problems.append(f"line {start}: {line_problem(pending, json_lines=True)}")
    return problems


def _array_problems(path: str) -> list[str]:
    """The problems of a file holding one JSON array, each naming its line."""
    with open_bytes(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return [f"line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x})"]
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        return [f"line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})"]
    if not all(isinstance(row, dict) for row in rows):
        return ["not a JSON array of objects (one object per row)"]
    return [
        f"line {line}: {problem}"
        for line, row in zip(_array_lines(text), rows, strict=True)
        if (problem := surrogate_problem(row))
    ]


def surrogate_problem(row: dict[str, Any]) -> str | None:
    """A string of the row holding a lone UTF-16 surrogate ("\\ud800": valid JSON, not text, so
    Arrow refuses the whole file); None if there is none."""
    for where, value in _strings(row, ()):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            field = repr(where[0]) + "".join(f"[{k!r}]" for k in where[1:])
            return (
                f"{field} holds a lone UTF-16 surrogate ({value[err.start]!r}), which is not "
                f"text: remove it, or escape the whole character (a surrogate pair)"
            )
    return None


def _strings(value: Any, where: tuple) -> Iterator[tuple[tuple, str]]:
    """(path, string) for every string in a JSON value (keys too)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield (*where, key), key
            yield from _strings(item, (*where, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*where, i))


def _array_lines(text: str) -> Iterator[int]:
    """The line each element of the JSON array `text` starts on (from 1)."""
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    line = 1 + text.count("\n", 0, i)
    while True:
        start = i
        while start < len(text) and text[start] in " \t\r\n,":
            start += 1
        if start >= len(text) or text[start] == "]":
            return
        line += text.count("\n", i, start)
        yield line
        _, i = decoder.raw_decode(text, start)
        line += text.count("\n", start, i)


def json_row_lines(path: str) -> Iterator[int]:
    """The line each row of a JSON Lines file (an object may span lines, as pretty-printed ones
    do), or each element of a JSON array, starts on. The loader skips blank lines, so they are
    counted here, as lines in an editor are."""
    if is_json_array(path):
        with open_bytes(path) as f:
            yield from _array_lines(f.read().decode("utf-8-sig"))
        return
    start, pending = 0, b""
    with open_bytes(path) as f:
        for number, line in enumerate(f, 1):
            if not pending and not line.strip():
                continue
            start, pending = start if pending else number, pending + line
            try:
                json.loads(pending)
            except ValueError:  # an object continued on the next line
                continue
            pending = b""
            yield start


def row_labels(sources: list[str], indices: Iterable[int]) -> dict[int, str]:
    """{row index: where the user finds it}: "line N" for JSON and JSON Lines files (the line the
    row starts on), prefixed by the file's name when the split has several; else "row N",
    counting from 1."""
    wanted = set(indices)
    if not wanted:  # nothing to name: do not read the files again
        return {}
    if not all(data_suffix(s) in (".json", ".jsonl") and Path(s).is_file() for s in sources):
        return {i: f"row {i + 1}" for i in wanted}
    labels, row = {}, 0
    for source in sources:
        prefix = f"{Path(source).name} " if len(sources) > 1 else ""
        for number in json_row_lines(source):
            if row in wanted:
                labels[row] = f"{prefix}line {number}"
                if len(labels) == len(wanted):
                    return labels
            row += 1
    return labels


def csv_problems(path: str) -> list[str]:
    """The records of a (UTF-8) CSV file whose number of fields is not the header's (pandas fills
    a short one with empty cells and refuses a long one without a line), or where its quoting
    breaks, each named by the line it starts on."""
    problems = []
    with open_bytes(path) as f:
        reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline=""), strict=True)
        try:
            header, start = next(reader, []), reader.line_num + 1
            for record in reader:
                if record and len(record) != len(header):
                    problems.append(
                        f"line {start}: {len(record)} fields, but the header has {len(header)}"
                    )
                start = reader.line_num + 1
        except csv.Error as err:
            problems.append(f"line {start}: not valid CSV ({err})")
        except UnicodeDecodeError:  # said line by line by `file_problem`
            pass
    return problems


def csv_columns(path: str) -> list[str]:
    """The column names in a CSV file's header (a UTF-8 byte-order mark dropped, as pandas does)."""
    with open_bytes(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
        return next(csv.reader(text), [])
