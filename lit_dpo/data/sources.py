"""Where rows come from: splits loaded from the Hub, a file, a directory of split files or memory,
and, when a file cannot be read, which line of it is at fault.

The ground floor of `lit_dpo.data`: imports nothing from the rest of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import datasets

SHOWN = 5  # bad rows (or lines) quoted one by one in an error; the rest are only counted
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_splits(
    source: str | datasets.Dataset | datasets.DatasetDict,
    config: str | None,
    wanted: dict[str, str | None],
) -> tuple[datasets.DatasetDict, dict[str, list[str]]]:
    """Load the splits named in `wanted` (role -> split name) that `source` has.

    Returns the splits and, per split, where its rows come from: its files, or one label for a
    Hub or in-memory dataset (for messages). A single file or Dataset is the train split.
    """
    train = wanted["train"]
    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({train: source})
    if isinstance(source, datasets.DatasetDict):
        label = "in-memory dataset"
        return _require_train(source, train, label), {s: [label] for s in source}
    path = Path(source).expanduser()
    if path.is_file() and path.suffix not in _BUILDERS:
        raise ValueError(f"{source}: unsupported file type; use one of {sorted(_BUILDERS)}")
    if path.is_file():
        files = {train: [str(path)]}
    elif path.is_dir():
        files = _split_files(path, [s for s in wanted.values() if s is not None])
    elif path.suffix in _BUILDERS or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset file or directory not found: {source}")
    else:
        try:
            raw = datasets.load_dataset(source, config)
        except Exception as err:  # offline, unknown name, gated: say which dataset failed
            raise ValueError(f"could not load dataset {source!r} from the Hub: {err}") from err
        return _require_train(raw, train, source), {s: [source] for s in raw}
    builders = {_BUILDERS[Path(f).suffix] for paths in files.values() for f in paths}
    if len(builders) > 1:
        raise ValueError(f"{source}: mixes file formats {sorted(builders)}; use one")
    try:
        raw = datasets.load_dataset(builders.pop(), data_files=files)
        for split in raw.values():  # pyarrow's JSON reader lets invalid UTF-8 into strings
            split.data.validate(full=True)
    except Exception as err:
        # datasets names neither the file nor the line ("An error occurred while generating
        # the dataset"); find them by reading the files ourselves, on this failure path only.
        paths = [f for split_files in files.values() for f in split_files]
        problem = next(filter(None, map(file_problem, paths)), None)
        raise ValueError(problem or f"{', '.join(paths)}: could not be loaded: {err}") from err
    return _require_train(raw, train, source), files


def _split_files(directory: Path, splits: list[str]) -> dict[str, list[str]]:
    """{split: its data files}: a file belongs to the split its name starts with."""
    files = {}
    for split in splits:
        found = sorted(
            str(f)
            for f in directory.iterdir()
            if f.name.startswith(split) and f.suffix in _BUILDERS
        )
        if found:
            files[split] = found
    if not files:
        raise FileNotFoundError(
            f"{directory}: no data files named after a split ({', '.join(splits)}) "
            f"with a suffix in {sorted(_BUILDERS)}"
        )
    return files


def _require_train(raw: datasets.DatasetDict, train: str, source: str) -> datasets.DatasetDict:
    if train not in raw:
        raise ValueError(f"{source}: no {train!r} split; found {sorted(raw)}")
    return raw


def file_problem(path: str) -> str | None:
    """Why a data file cannot be read, naming the line; None when no reason is found here.

    Checks that the file has rows, is UTF-8 (JSON and CSV) and that each line of JSON Lines,
    or the whole of a JSON array, parses to objects.
    """
    suffix = Path(path).suffix
    if suffix == ".parquet":
        return None  # pyarrow's own message names the problem; the caller adds the file
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head:
        return f"{path}: no rows (the file is empty)"
    if suffix == ".json" and head.startswith(b"["):  # one JSON array: parse the whole file
        data = Path(path).read_bytes()
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            return f"{path}: line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x})"
        except json.JSONDecodeError as err:
            return f"{path}: line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
        if not all(isinstance(row, dict) for row in rows):
            return f"{path}: not a JSON array of objects (one object per row)"
        return None
    problems = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if problem := line_problem(line, json_lines=suffix != ".csv"):
                problems.append(f"line {number}: {problem}")
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
    return None if isinstance(row, dict) else f"not a JSON object but {type(row).__name__}"


def row_labels(sources: list[str], indices: Iterable[int]) -> dict[int, str]:
    """{row index: where the user finds it}: "line N" for JSON Lines (the loader skips blank
    lines, so they are counted here), prefixed by the file's name when the split has several;
    else "row N", counting from 1."""
    wanted = set(indices)
    if not all(s.endswith(".jsonl") and os.path.isfile(s) for s in sources):
        return {i: f"row {i + 1}" for i in wanted}
    labels, row = {}, 0
    for source in sources:
        prefix = f"{Path(source).name} " if len(sources) > 1 else ""
        with open(source, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    if row in wanted:
                        labels[row] = f"{prefix}line {number}"
                    row += 1
    return labels
