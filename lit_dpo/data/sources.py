"""Where rows come from: splits loaded from the Hub, a file, a directory of split files or memory.

Every file is read as it is: CSV cells are text (never numbers, never "NA" read as missing), a
JSON array is read whatever its suffix, compressed files (`.gz`, `.bz2`, `.xz`, `.zst`) are read
through their codec. What cannot be read is named by file and line (see `files`). A directory's
files belong to the splits their names start with, under the common aliases (`val`, `dev`, ...
for validation), and a data file that names no split is refused rather than left out. Data
without a `train` (or `test`) split but with `train_prefs` (`test_prefs`), as
UltraFeedback-binarized ships it, is read from those (`resolve_splits`).
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

import datasets

from lit_dpo.data.files import (
    BUILDERS,
    COMPRESSED,
    codec_problem,
    csv_columns,
    data_suffix,
    file_problem,
)

# role -> the file names (before a separator) that hold it, when the role keeps its default name
ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "eval", "evaluation"),
    "test": ("test", "testing"),
}
_BUILDER_NAMES = ("json", "csv", "parquet")  # `datasets` builders, for `data_files`
_SEPARATOR = re.compile(r"[-._ 0-9]")  # "train-00000-of-00002.parquet", "val.jsonl", "test_1.csv"
_OWN_NAME = re.compile(r"[^-. ]+")  # "train_prefs" of "train_prefs-00000-of-00001.parquet"
_OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_ON = ("1", "ON", "YES", "TRUE")  # as huggingface_hub reads these variables


def resolve_splits(
    available: Iterable[str], wanted: dict[str, str | None]
) -> dict[str, str | None]:
    """`wanted` (role -> split name), where a role asked for under its default name (train,
    validation, test) that `available` lacks, under any alias, but holds as `<role>_prefs`
    (UltraFeedback-binarized: train_prefs, test_prefs beside train_sft, train_gen, ...) takes
    that split."""
    available = set(available)
    resolved = dict(wanted)
    for role, split in wanted.items():
        prefs = f"{role}_prefs"
        if split == role and not available & set(ALIASES[role]) and prefs in available:
            resolved[role] = prefs
    return resolved


def load_splits(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    config: str | None,
    wanted: dict[str, str | None],
    *,
    revision: str | None = None,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
) -> tuple[datasets.DatasetDict, dict[str, list[str]]]:
    """Load the splits named in `wanted` (role -> split name, see `resolve_splits`) that
    `source` has.

    Returns the splits and, per split, where its rows come from: its files, or one label for a
    Hub or in-memory dataset (for messages). A single file or Dataset is the train split.
    `config` (a configuration name), `revision` and `data_files` go to `datasets.load_dataset`
    for a Hub dataset; `data_files` also picks the files of a local directory (relative to it)
    or of a builder name (`json`, `csv`, `parquet`): {split: file(s) or glob(s)}, or the train
    split's files.
    """
    train = wanted["train"]
    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({train: source})
    if (revision is not None or data_files is not None) and not isinstance(
        source, str | os.PathLike
    ):
        raise ValueError(
            "revision and data_files apply to a Hub dataset or to files, not to rows in memory"
        )
    if isinstance(source, datasets.DatasetDict):
        label = "in-memory dataset"
        train = resolve_splits(source, wanted)["train"]
        return _require_train(source, train, label), {s: [label] for s in source}
    source = os.fspath(source)
    path = Path(source).expanduser()
    local = path.exists() or source in _BUILDER_NAMES or _looks_local(source)
    if revision is not None and local:
        raise ValueError(
            f"revision={revision!r} picks a version of a Hub dataset; {source} is local"
        )
    if path.is_file() and data_suffix(path) is None:
        raise ValueError(
            f"{source}: unsupported file type; use one of {sorted(BUILDERS)} (or "
            f"{', '.join(COMPRESSED)} of json, jsonl or csv)"
        )
    if data_files is not None and (path.is_dir() or source in _BUILDER_NAMES):
        files = _named_files(path if path.is_dir() else Path.cwd(), data_files, train)
        train = resolve_splits(files, wanted)["train"]
    elif data_files is not None and path.is_file():
        raise ValueError(
            f"{source}: data_files picks files of a directory or Hub dataset, not of a file"
        )
    elif path.is_file():
        files = {train: [str(path)]}
    elif path.is_dir():
        wanted = resolve_splits(map(_own_name, os.listdir(path)), wanted)
        train = wanted["train"]
        files = _split_files(path, wanted)
    elif _looks_local(source):
        raise FileNotFoundError(_not_found(source))
    else:
        try:
            raw = datasets.load_dataset(source, config, revision=revision, data_files=data_files)
        except Exception as err:  # offline, unknown name, gated: say which dataset failed
            offline = next((v for v in _OFFLINE if os.environ.get(v, "").upper() in _ON), None)
            if offline:  # no Hub to ask: most likely a local path mistyped
                raise ValueError(
                    f"{_not_found(source)}; could not load dataset {source!r} from the Hub "
                    f"either ({offline} is set, and it is not in the cache)"
                ) from err
            raise ValueError(f"could not load dataset {source!r} from the Hub: {err}") from err
        train = resolve_splits(raw, wanted)["train"]
        return _require_train(raw, train, source), {s: [source] for s in raw}
    builders = {BUILDERS[data_suffix(f)] for paths in files.values() for f in paths}
    if len(builders) > 1:
        raise ValueError(f"{source}: mixes file formats {sorted(builders)}; use one")
    builder = builders.pop()
    raw = datasets.DatasetDict(
        {split: _load_files(builder, paths) for split, paths in files.items()}
    )
    return _require_train(raw, train, source), files


def _load_files(builder: str, paths: list[str]) -> datasets.Dataset:
    """One split's files as a Dataset; a file that cannot be read is named, with its line."""
    if problem := next(filter(None, map(codec_problem, paths)), None):
        raise ValueError(problem)
    options = {}
    if builder == "csv":  # every cell is text: "4" stays "4", "NA" and "" stay themselves
        columns = csv_columns(paths[0])
        for path in paths:
            if (other := csv_columns(path)) != columns:
                raise ValueError(f"{path}: columns {other} differ from {paths[0]}'s {columns}")
            if problem := file_problem(path):  # pandas would fill a short record silently
                raise ValueError(problem)
        features = datasets.Features({c: datasets.Value("string") for c in columns})
        options = {"features": features, "keep_default_na": False, "na_filter": False}
    try:
        split = datasets.load_dataset(builder, data_files={"rows": paths}, **options)["rows"]
        split.data.validate(full=True)  # pyarrow's JSON reader lets invalid UTF-8 into strings
    except Exception as err:
        # datasets names neither the file nor the line ("An error occurred while generating
        # the dataset"); find them by reading the files ourselves, on this failure path only.
        problem = next(filter(None, map(file_problem, paths)), None)
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        why = f"{err} ({cause})" if cause is not err else str(err)
        raise ValueError(problem or f"{', '.join(paths)}: could not be loaded: {why}") from err
    return split


def _named_files(
    base: Path, data_files: str | list[str] | dict[str, str | list[str]], train: str
) -> dict[str, list[str]]:
    """{split: its files}, from `data_files` (paths or globs, relative to `base`); a string or
    list names the train split's files."""
    if not isinstance(data_files, dict):
        data_files = {train: data_files}
    files = {}
    for split, patterns in data_files.items():
        found = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            full = str(base / Path(pattern).expanduser())
            matches = sorted(glob.glob(full)) if any(c in full for c in "*?[") else [full]
            if not matches or not Path(matches[0]).is_file():
                raise FileNotFoundError(f"data_files: {_not_found(full)}")
            for match in matches:
                if data_suffix(match) is None:
                    raise ValueError(
                        f"data_files: {match}: unsupported file type; use one of "
                        f"{sorted(BUILDERS)} (or {', '.join(COMPRESSED)} of json, jsonl or csv)"
                    )
            found += matches
        files[split] = found
    return files


def _own_name(file_name: str) -> str:
    """The split a file of a directory names exactly: "train_prefs" for
    "train_prefs-00000-of-00001.parquet", "test" for "test_1.csv"."""
    match = _OWN_NAME.match(file_name)
    return re.sub(r"_\d+$", "", match.group()) if match else file_name


def _split_files(directory: Path, wanted: dict[str, str | None]) -> dict[str, list[str]]:
    """{split: its data files}: a file belongs to the split its name starts with (then a
    separator, a digit or the suffix), the longest such name; a role under its default name
    also takes that name's `ALIASES`. A data file that names no split is an error."""
    names = {}  # file name stem -> split it fills
    for role, split in wanted.items():
        if split is not None:
            names |= dict.fromkeys(ALIASES[role] if split == role else (split,), split)
    known = set(names) | {alias for aliases in ALIASES.values() for alias in aliases}
    files: dict[str, dict[str, list[str]]] = {}  # split -> {name used: files}
    strays = []
    for f in sorted(directory.iterdir()):
        if not f.is_file() or data_suffix(f) is None:
            continue  # README.md, LICENSE, ...
        name = _split_name(f.name, known)
        if name is None:
            strays.append(f.name)
        elif name in names:
            files.setdefault(names[name], {}).setdefault(name, []).append(str(f))
    splits = ", ".join(s for s in wanted.values() if s is not None)
    if not files:
        found = f"; found {', '.join(strays)}" if strays else ""
        raise FileNotFoundError(
            f"{directory}: no data files named after a split ({splits}) "
            f"with a suffix in {sorted(BUILDERS)}{found}"
        )
    if strays:
        aliases = "/".join(ALIASES["validation"][1:])
        also = f"; validation also as {aliases}" if wanted.get("validation") == "validation" else ""
        raise ValueError(
            f"{directory}: {', '.join(strays)}: data file{'s' if len(strays) > 1 else ''} "
            f"named after no split; name each file after its split ({splits}{also}) or move it "
            f"out of the directory"
        )
    for split, by_name in files.items():
        if len(by_name) > 1:
            found = ", ".join(Path(f).name for paths in by_name.values() for f in paths)
            raise ValueError(
                f"{directory}: {found} all hold split {split!r} under different names; keep one"
            )
    return {split: paths for split, by_name in files.items() for paths in by_name.values()}


def _split_name(file_name: str, names: set[str]) -> str | None:
    """The longest of `names` that `file_name` starts with, followed by a separator."""
    fits = [
        n
        for n in names
        if file_name.startswith(n) and _SEPARATOR.match(file_name[len(n) : len(n) + 1] or ".")
    ]
    return max(fits, key=len, default=None)


def _looks_local(source: str) -> bool:
    """Whether a string that is no existing path names a file or directory rather than a Hub
    dataset ("org/name"): it has a data suffix, starts like a path, has more than one
    separator, or its parent directory exists here."""
    parent = Path(source).expanduser().parent
    return (
        data_suffix(source) is not None
        or source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or (str(parent) != "." and parent.is_dir())
    )


def _not_found(source: str) -> str:
    """The not-found message, with the close names in the parent directory, if any."""
    path = Path(source).expanduser()
    parent = path.parent
    close = []
    if parent.is_dir():
        names = [p.name for p in parent.iterdir()]
        close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    prefix = "" if str(Path(source).parent) == "." else f"{Path(source).parent}/"
    hint = f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""
    return f"dataset file or directory not found: {source}{hint}"


def _require_train(raw: datasets.DatasetDict, train: str, source: str) -> datasets.DatasetDict:
    if train not in raw:
        raise ValueError(f"{source}: no {train!r} split; found {sorted(raw)}")
    return raw
