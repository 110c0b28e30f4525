"""Preference pairs from files, the Hub or memory: load -> validate -> tokenize -> collate.

Every rule about what a row may hold and how it becomes tokens lives here.

Validation looks at every row before anything is tokenized and collects every problem it finds
(docs/errors.md lists them, with the messages the user sees). Bad rows are handled by the
`on_bad_rows` policy: `error` stops with one message naming the file, the split, the first bad
rows (by line number for JSON Lines) and how many rows have each problem; `skip` trains on the
rest and writes each bad row, with its reasons, to a rejects file.

Tokenization:

- prompt and completions are tokenized separately, so the chosen and rejected rows of a pair
  share the very same prompt tokens;
- BOS appears once: plain prompts get the tokenizer's special tokens (minus a second BOS when the
  text already starts with one); chat-template text already holds its specials and gets none;
- EOS ends each completion exactly once (not appended when the rendered turn already ends with it);
- a row longer than `max_length` first has its prompt cut to `max_prompt_length`, then its
  completions cut to the room left; every cut is counted in `PreferenceDataModule.stats`. A row
  whose prompt leaves no room for one completion token (possible only when `max_prompt_length
  >= max_length`) is a bad row, handled by `on_bad_rows` like the others.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import datasets
import jinja2
import lightning as L
import pyarrow.compute as pc
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_dpo.hub import resolve

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there
ID_COLUMNS = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
_TOKENIZED = datasets.Features(
    {c: datasets.Sequence(datasets.Value("int32")) for c in ID_COLUMNS}
    | {
        "prompt_truncated": datasets.Value("bool"),
        "completions_truncated": datasets.Value("int8"),
        "problem": datasets.Value("string"),  # "" unless the row could not be tokenized
    }
)
_CHECKED = datasets.Features({"problems": datasets.List(datasets.Value("string"))})
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_HH_TURN = "\n\nAssistant:"  # Anthropic-HH: the prompt ends where the last answer starts
ROLES = ("system", "developer", "user", "assistant", "tool")
_SHOWN = 5  # bad rows quoted one by one in an error; the rest are only counted

Layout = Literal["pair", "implicit", "completion"]
FIELDS: dict[str, tuple[str, ...]] = {
    "pair": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),  # the prompt is their shared beginning
    "completion": ("prompt", "completion"),  # SFT rows, tokenized as chosen = rejected
}


class PreferenceDataModule(L.LightningDataModule):
    """Pairs of (prompt, chosen, rejected) completions, tokenized once and batched for DPO.

    Each batch holds `input_ids`, `attention_mask` and `labels` of shape (2B, T): rows 0..B-1
    are prompt+chosen, rows B..2B-1 prompt+rejected (see `collate_pairs`).

    Rows are standard (`prompt`, `chosen`, `rejected` strings), conversational (the same fields
    as lists of `{role, content}` messages, rendered with the tokenizer's chat template),
    implicit-prompt (only `chosen` and `rejected`, strings or messages, whose shared beginning is
    the prompt), or completions (`prompt` and `completion`, strings or messages, no pair: for
    SFT). A completion row is tokenized as if chosen = rejected = completion, so batches keep
    their layout and an SFT step uses rows 0..B-1. Other columns are ignored. One split holds one
    format: the first row's decides.

    Args:
        dataset: A Hub dataset name, a local .json/.jsonl/.parquet/.csv file (its rows are the
            train split), a directory of such files (a file belongs to the split its name
            starts with: train.jsonl, validation.jsonl, test.jsonl), or an in-memory
            `datasets.Dataset` (the train split) or `datasets.DatasetDict`.
        tokenizer: A tokenizer name or path (anything `lit_dpo.hub.resolve` accepts) or a
            tokenizer object. Required; the CLI links it to the model's name. Without a pad
            token, batches are padded with EOS (padding is masked out anyway).
        dataset_config: The configuration name of a Hub dataset.
        train_split: The split to train on.
        val_split: The validation split; when the dataset lacks it, `val_fraction` of the train
            split is held out instead. None: no validation.
        test_split: The test split, used when the dataset has it. None: no test split.
        val_fraction: The fraction of train rows held out (seeded) when there is no validation
            split; 0 means no validation.
        max_length: The most tokens of prompt plus completion in one row.
        max_prompt_length: The most prompt tokens kept when a row exceeds `max_length`.
        truncation_mode: Which prompt tokens survive that cut: `keep_end` keeps the last ones
            (and a leading BOS), `keep_start` the first ones.
        batch_size: Preference pairs per training batch (each pair gives two rows).
        eval_batch_size: Pairs per validation/test batch; None: `batch_size`.
        pad_to_multiple_of: Round each batch's length up to a multiple of this; None: no rounding.
        packing: Padding-free batches: the 2B sequences of a batch side by side in as few rows
            as hold them, each with its own `position_ids` (transformers then attends within each
            sequence only), so little compute goes to padding. Needs an attention that reads
            packed position_ids (sdpa, eager, flash_attention_2 in transformers >= 4.56).
            DPOModule only.
        group_by_length: Where packing is off: within each run of 64 batches of the (seeded)
            shuffle, order rows by length, so a batch holds rows of similar length and pads
            little. The order stays a function of (seed, epoch): resuming is still exact.
        num_workers: DataLoader worker processes.
        num_proc: Processes for validation and tokenization (`datasets.Dataset.map`); None: one.
        seed: Seed of the train shuffle and of the held-out validation split.
        trust_remote_code: Allow custom code when loading the tokenizer.
        on_bad_rows: What to do with rows that cannot be trained on (an empty or missing field,
            chosen identical to rejected, a conversation not ending with the assistant, ...;
            every row is checked before training). `error`: stop before training with one
            message naming the file, split, rows and problems. `skip`: train on the rest, write
            each bad row with its reasons to `rejects_path`, and log how many rows had each
            problem (also kept in `stats`).
        rejects_path: The JSON Lines file the skipped rows go to. None: `rejects.jsonl` in the
            run's log directory (`trainer.log_dir`) when attached to a Trainer, else in the
            working directory. Written (replaced) only under `skip`.
    """

    def __init__(
        self,
        dataset: str | datasets.Dataset | datasets.DatasetDict,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = "test",
        val_fraction: float = 0.05,
        max_length: int = 512,
        max_prompt_length: int = 256,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        packing: bool = False,
        group_by_length: bool = False,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
        trust_remote_code: bool = False,
        on_bad_rows: Literal["error", "skip"] = "error",
        rejects_path: str | None = None,
    ) -> None:
        super().__init__()
        # The CLI's types already refuse most of these; Python callers get the same words.
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_prompt_length < 1 or max_length < 1:
            raise ValueError("max_length and max_prompt_length must be positive")
        for name, value in [
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("pad_to_multiple_of", pad_to_multiple_of),
        ]:
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(
                f"truncation_mode must be keep_end or keep_start, got {truncation_mode!r}"
            )
        if on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows must be error or skip, got {on_bad_rows!r}")
        # Objects (an in-memory dataset, a tokenizer) do not belong in checkpoints.
        objects = {"dataset": dataset, "tokenizer": tokenizer}
        self.save_hyperparameters(
            ignore=[k for k, v in objects.items() if not isinstance(v, str | None)]
        )
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packing = packing
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.on_bad_rows = on_bad_rows
        self.rejects_path = rejects_path
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.test_dataset: datasets.Dataset | None = None
        self.stats: dict[str, dict[str, Any]] = {}  # per loaded split, see `_prepare_split`
        self.rejects: list[dict[str, Any]] = []  # the skipped rows, see `_prepare_split`

    def prepare_data(self) -> None:
        # Files and Hub data: tokenize here (local rank 0) so the map lands in the datasets
        # cache and `setup` on every rank only reads it. In-memory data has no cache. Bad rows
        # under on_bad_rows=error stop the run here, before any rank trains.
        if isinstance(self.dataset, str):
            self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:  # fit, validate and test share one build
            return
        splits = self._build()
        rejects = None
        if self.on_bad_rows == "skip":
            rejects = self._rejects_file()  # on every rank: trainer.log_dir is a collective
            self._write_rejects(rejects)
        for split, s in self.stats.items():
            rank_zero_info(
                f"{split}: {s['rows']} rows, {s['skipped']} skipped, {s['prompts_truncated']} "
                f"prompts truncated, {s['completions_truncated']} completions truncated"
            )
            if s["skipped"]:
                rank_zero_info(
                    f"{split}: skipped {count_problems(s['problems'])}; each skipped row is in "
                    f"{rejects} with its reasons"
                )
        if self.tokenizer.pad_token_id is None:
            rank_zero_info("the tokenizer has no pad token: batches are padded with EOS (masked)")
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None:  # the run's record keeps what was skipped and cut, per split
            counts = ("rows", "skipped", "prompts_truncated", "completions_truncated")
            logger.log_hyperparams(
                {f"data/{split}/{k}": s[k] for split, s in self.stats.items() for k in counts}
            )
        # Each row carries its index in its split: a precomputed reference is looked up by it.
        indexed = {k: v.add_column("index", range(len(v))) for k, v in splits.items()}
        self.train_dataset = indexed["train"]
        self.val_dataset = indexed.get("validation")
        self.test_dataset = indexed.get("test")

    def _build(self) -> dict[str, datasets.Dataset]:
        """Load, validate and tokenize every split; hold out validation rows if needed.

        Returns {"train", and where present "validation", "test": tokenized dataset}.
        """
        tokenizer = self._load_tokenizer()
        wanted = {"train": self.train_split, "validation": self.val_split, "test": self.test_split}
        raw, sources = load_splits(self.dataset, self.dataset_config, wanted)
        self.stats, self.rejects = {}, []
        tokenized = {}
        for role, split in wanted.items():
            if split is not None and split in raw:
                tokenized[role] = self._prepare_split(raw[split], split, sources[split], tokenizer)
        if "validation" not in tokenized and self.val_split is not None and self.val_fraction > 0:
            n = len(tokenized["train"])
            if math.ceil(self.val_fraction * n) >= n:  # datasets would refuse, less clearly
                raise ValueError(
                    f"{', '.join(sources[self.train_split])}: split {self.train_split!r}: too "
                    f"few rows ({n}) to hold out val_fraction={self.val_fraction} for "
                    f"validation; add rows or a validation split, or set val_fraction: 0"
                )
            held_out = tokenized["train"].train_test_split(
                test_size=self.val_fraction, seed=self.seed
            )
            tokenized["train"], tokenized["validation"] = held_out["train"], held_out["test"]
        return {role: data.select_columns(ID_COLUMNS) for role, data in tokenized.items()}

    def _prepare_split(
        self,
        dataset: datasets.Dataset,
        split: str,
        sources: list[str],
        tokenizer: PreTrainedTokenizerBase,
    ) -> datasets.Dataset:
        """Validate and tokenize one split, its bad rows handled by `on_bad_rows`.

        Fills `self.stats[split]` with rows (before skipping) / skipped / prompts_truncated /
        completions_truncated (chosen and rejected counted separately) / problems ({problem:
        rows}), and appends the skipped rows to `self.rejects`. A held-out validation set is
        counted within its source split.
        """
        where = f"{', '.join(sources)}: split {split!r}"
        layout, chat = detect_format(dataset, where, tokenizer)
        bad = find_bad_rows(dataset, layout, chat, self.num_proc)
        self._refuse(bad, len(dataset), where, sources)
        keep = [i for i in range(len(dataset)) if i not in bad]
        tokenized, counts, dropped = tokenize_rows(
            dataset.select(keep) if bad else dataset,
            tokenizer,
            where,
            layout,
            chat,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
            keep_end=self.truncation_mode == "keep_end",
            num_proc=self.num_proc,
        )
        bad |= {keep[i]: [problem] for i, problem in dropped.items()}  # by source row index
        self._refuse(bad, len(dataset), where, sources)
        labels = row_labels(sources, bad)
        rows = dataset.select(sorted(bad)).to_list() if bad else []
        self.rejects += [
            {"split": split, "row": i + 1, "where": labels[i], "problems": bad[i], "data": row}
            for i, row in zip(sorted(bad), rows, strict=True)
        ]
        self.stats[split] = {
            "rows": len(dataset),
            "skipped": len(bad),
            "prompts_truncated": counts["prompts_truncated"],
            "completions_truncated": counts["completions_truncated"],
            "problems": dict(Counter(p for problems in bad.values() for p in problems)),
        }
        return tokenized

    def _refuse(self, bad: dict[int, list[str]], n_rows: int, where: str, sources: list[str]):
        """Stop, describing the bad rows, under on_bad_rows=error or when no row is left."""
        if not bad or (self.on_bad_rows == "skip" and len(bad) < n_rows):
            return
        labels = row_labels(sources, sorted(bad)[:_SHOWN])
        if len(bad) == n_rows:
            then = "no rows left to train on"
        else:
            then = (
                "fix these rows, or set on_bad_rows: skip to train on the rest (the skipped rows "
                "are written, with their reasons, to a rejects file)"
            )
        raise ValueError(f"{describe_bad_rows(where, bad, n_rows, labels)}\n{then}")

    def _rejects_file(self) -> Path:
        if self.rejects_path is not None:
            return Path(self.rejects_path)
        trainer = self.trainer
        log_dir = (trainer.log_dir or trainer.default_root_dir) if trainer is not None else None
        return Path(log_dir or os.getcwd()) / "rejects.jsonl"

    @rank_zero_only
    def _write_rejects(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for reject in self.rejects:
                f.write(json.dumps(reject, ensure_ascii=False, default=str) + "\n")

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("PreferenceDataModule needs a tokenizer (a name, a path or an object)")
        if isinstance(self.tokenizer, str):
            self.tokenizer = AutoTokenizer.from_pretrained(
                resolve(self.tokenizer), trust_remote_code=self.trust_remote_code
            )
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end completions with")
        return self.tokenizer

    def collate(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """`collate_pairs` with this module's padding settings."""
        # No pad token: pad with EOS; padding is masked out of attention and labels anyway.
        pad = self.tokenizer.pad_token_id
        return collate_pairs(
            rows,
            pad_token_id=self.tokenizer.eos_token_id if pad is None else pad,
            pad_to_multiple_of=self.pad_to_multiple_of,
            packing=self.packing,
        )

    def _loader(self, dataset: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # Resumable order: the shuffle is a function of (seed, epoch) alone (Lightning calls
        # `set_epoch`) and the stateful loader saves its position in the epoch in every
        # checkpoint, so a killed run resumed from its last checkpoint sees exactly the batches
        # it would have seen. Lightning keeps a DistributedSampler as it is, so it is sharded
        # across ranks here.
        shard = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        shard = shard or {"num_replicas": 1, "rank": 0}
        sampler = None
        if shuffle and self.group_by_length and not self.packing:
            sampler = LengthGroupedSampler(dataset, 64 * batch_size, seed=self.seed, **shard)
        elif shuffle:
            sampler = DistributedSampler(dataset, seed=self.seed, **shard)
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning there is nothing to validate on.
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        if self.test_dataset is None:
            return []
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)


# ---------------------------------------------------------------------------------------- load


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
            if problem := _line_problem(line, json_lines=suffix != ".csv"):
                problems.append(f"line {number}: {problem}")
    if not problems:
        return None
    more = f"; ... {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    lines = f"{len(problems)} bad line{'' if len(problems) == 1 else 's'}"
    return f"{path}: {lines}: {'; '.join(problems[:_SHOWN])}{more}"


def _line_problem(line: bytes, json_lines: bool) -> str | None:
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


def row_labels(sources: list[str], indices) -> dict[int, str]:
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


# ------------------------------------------------------------------------------------ validate


def detect_format(
    dataset: datasets.Dataset, where: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[Layout, bool]:
    """(layout, chat) of a split, from its columns and its first row with a usable value.

    chat: the completions are message lists, rendered with the tokenizer's chat template (so it
    must have one), not strings.
    """
    columns = dataset.column_names
    if "chosen" in columns or "rejected" in columns:
        layout = "pair" if "prompt" in columns else "implicit"
    elif "completion" in columns:
        layout = "completion"
    else:
        raise ValueError(
            f"{where}: no 'chosen'/'rejected' or 'completion' column; found {columns}. Rows need "
            f"prompt/chosen/rejected, chosen/rejected (implicit prompt) or prompt/completion"
        )
    for field in FIELDS[layout]:
        if field not in columns:
            raise ValueError(f"{where}: missing column {field!r}; found {columns}")
    if len(dataset) == 0:
        raise ValueError(f"{where}: no rows")
    key = "completion" if layout == "completion" else "chosen"
    for batch in dataset.select_columns([key]).iter(batch_size=1000):
        value = next((v for v in batch[key] if isinstance(v, str | list)), None)
        if value is not None:
            break
    chat = isinstance(value, list)  # no usable value at all: text, and every row says why
    if chat and not tokenizer.chat_template:
        raise ValueError(f"{where}: rows are conversational but the tokenizer has no chat template")
    return layout, chat


def find_bad_rows(
    dataset: datasets.Dataset, layout: Layout, chat: bool, num_proc: int | None = None
) -> dict[int, list[str]]:
    """{row index: its problems} for every row that cannot be trained on (see `row_problems`).

    One `datasets.map` pass over every row (cached on disk for file-backed datasets, so
    `prepare_data` and `setup` check a file once).
    """
    checked = dataset.map(
        _check_batch,
        batched=True,
        input_columns=list(FIELDS[layout]),
        remove_columns=dataset.column_names,
        features=_CHECKED,
        num_proc=num_proc,
        desc="Checking rows",
        fn_kwargs=dict(layout=layout, chat=chat),
    )
    problems = checked.with_format("arrow")["problems"]  # (rows,) lists; Arrow, as row-by-row
    bad = pc.indices_nonzero(pc.list_value_length(problems))  # Python is slow
    return dict(zip(bad.to_pylist(), problems.take(bad).to_pylist(), strict=True))


def _check_batch(*columns: list, layout: Layout, chat: bool) -> dict[str, list]:
    fields = FIELDS[layout]
    rows = (dict(zip(fields, values, strict=True)) for values in zip(*columns, strict=True))
    return {"problems": [row_problems(row, layout, chat) for row in rows]}


def row_problems(row: dict[str, Any], layout: Layout, chat: bool) -> list[str]:
    """What stops one row from being trained on, each problem naming its field; [] if nothing.

    `chat`: the split's rows are message lists (the first row decided); a row of the other kind
    is a mix of formats.
    """
    problems = []
    for field in FIELDS[layout]:
        # an implicit-prompt row's chosen/rejected hold the whole conversation
        part = "prompt" if field == "prompt" else "whole" if layout == "implicit" else "answer"
        problem = _message_problem if chat else _text_problem
        if found := problem(row[field], repr(field), part):
            problems.append(found)
    if problems or layout == "completion":
        return problems
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen == rejected or not chat and chosen.rstrip() == rejected.rstrip():
        return ["'chosen' is identical to 'rejected'"]  # (completions lose trailing whitespace)
    if layout == "implicit":
        return _shared_prompt_problems(chosen, rejected, chat)
    return []


def _text_problem(value: Any, field: str, part: str) -> str | None:
    if value is None:
        return f"{field} is null or missing"
    if isinstance(value, list):
        return f"{field} is a list of messages, but the split's first row is text (mixed formats)"
    if not isinstance(value, str):
        return f"{field} must be a string, got {type(value).__name__}"
    if not value:
        return f"{field} is empty"
    if not value.strip():
        return f"{field} is whitespace only"
    return None


def _message_problem(value: Any, field: str, part: str) -> str | None:
    """`part`: "prompt", "answer" (the assistant's turn after a separate prompt) or "whole" (a
    conversation that ends with the answer)."""
    if value is None:
        return f"{field} is null or missing"
    if isinstance(value, str):
        return f"{field} is a string, but the split's first row is messages (mixed formats)"
    if not isinstance(value, list):
        return f"{field} must be a list of {{role, content}} messages, got {type(value).__name__}"
    if not value:
        return f"{field} is an empty list of messages"
    for message in value:
        if not isinstance(message, dict):
            kind = type(message).__name__
            return f"{field} must be a list of {{role, content}} messages, got a list of {kind}"
        if message.get("role") is None:
            # ShareGPT's {"from": "human", "value": ...} is the usual cause
            hint = (
                " (ShareGPT 'from'/'value'? rename to 'role'/'content')"
                if message.get("from") is not None
                else ""
            )
            return f"{field} has a message without a 'role'{hint}"
        if message["role"] not in ROLES:
            return (
                f"{field} has a message with unknown role {message['role']!r} "
                f"(known: {', '.join(ROLES)})"
            )
        if message.get("content") is None:
            return f"{field} has a message without 'content'"
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            return f"{field} has a message whose 'content' is {kind}, not a string"
    if part == "prompt":
        return (
            None if any(m["content"].strip() for m in value) else f"{field} has only empty messages"
        )
    if part == "answer" and value[0]["role"] != "assistant":
        return (
            f"{field} starts with a {value[0]['role']!r} message; it should hold only the "
            f"assistant's answer (is the prompt repeated in it?)"
        )
    if value[-1]["role"] != "assistant":
        return f"{field} ends with a {value[-1]['role']!r} message, not the assistant's"
    if not value[-1]["content"].strip():
        return f"{field} ends with an empty assistant message"
    return None


def _shared_prompt_problems(chosen: str | list, rejected: str | list, chat: bool) -> list[str]:
    """An implicit-prompt row must begin with a prompt both completions share."""
    if not chat:
        prompt, chosen, rejected = split_text_prompt(chosen, rejected)
        if not prompt:
            return ["'chosen' and 'rejected' share no beginning to use as the prompt"]
        if not chosen.strip() or not rejected.strip():
            return ["'chosen' or 'rejected' has nothing after the prompt they share"]
        return []
    prompt, chosen, rejected = split_message_prompt(chosen, rejected)
    if not prompt:
        return ["'chosen' and 'rejected' share no prompt messages (different prompts)"]
    if not chosen or not rejected:
        return ["'chosen' or 'rejected' has no answer after the prompt they share"]
    if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        return ["'chosen' and 'rejected' differ before the assistant's answer (different prompts)"]
    return []


def describe_bad_rows(
    where: str, bad: dict[int, list[str]], n_rows: int, labels: dict[int, str]
) -> str:
    """The first bad rows with their problems, then how many rows have each problem."""
    shown = sorted(bad)[:_SHOWN]
    lines = [f"{where}: {len(bad)} of {n_rows} rows cannot be trained on:"]
    lines += [f"  {labels[i]}: {'; '.join(bad[i])}" for i in shown]
    if len(bad) > len(shown):
        lines.append(f"  ... {len(bad) - len(shown)} more rows")
    counts = Counter(p for problems in bad.values() for p in problems)
    lines.append(f"  by problem: {count_problems(counts)}")
    return "\n".join(lines)


def count_problems(counts: dict[str, int]) -> str:
    """{problem: rows} -> "3 rows: 'chosen' is empty; 1 row: ...", the most common first."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return "; ".join(f"{n} row{'' if n == 1 else 's'}: {problem}" for problem, n in ranked)


def split_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) from two strings that start alike.

    The prompt is their common prefix, cut back to the end of the last Anthropic-HH
    "\\n\\nAssistant:" turn it holds, else to a word boundary (so neither completion starts
    mid-word or is empty); the space before the cut goes to the completions, as a BPE
    tokenizer would attach it to the next word.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prefix = chosen[:n]
    if _HH_TURN in prefix:
        n = prefix.rindex(_HH_TURN) + len(_HH_TURN)
    else:
        while n > 0 and not prefix[n - 1].isspace():  # drop the last, possibly partial, word
            n -= 1
        while n > 0 and prefix[n - 1].isspace():
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def split_message_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) messages: the prompt is the leading messages both share."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


# ------------------------------------------------------------------------------------ tokenize


class RowProblem(ValueError):
    """A problem with one row that only tokenization reveals; handled by `on_bad_rows`."""


def tokenize_rows(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    layout: Layout,
    chat: bool,
    max_length: int,
    max_prompt_length: int,
    keep_end: bool,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int], dict[int, str]]:
    """Tokenize one split of checked rows (see `find_bad_rows`).

    Returns the tokenized rows (`ID_COLUMNS` and the truncation flags), the counts (rows,
    prompts_truncated, completions_truncated, dropped) and {row index: problem} for the rows
    left out: a prompt leaving no room for a completion, or a conversation the chat template
    refuses or renders without the prompt as a prefix.

    The map is cached on disk for file-backed datasets; its fingerprint hashes the function
    and all of `fn_kwargs` (tokenizer included), so changing any of them re-tokenizes.
    """
    out = dataset.map(
        _tokenize_batch,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        features=_TOKENIZED,
        desc=f"Tokenizing {where}",
        fn_kwargs=dict(
            tokenizer=tokenizer,
            layout=layout,
            chat=chat,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            keep_end=keep_end,
        ),
    )
    problem = out.with_format("arrow")["problem"]
    rows = pc.indices_nonzero(pc.binary_length(problem))
    dropped = dict(zip(rows.to_pylist(), problem.take(rows).to_pylist(), strict=True))
    if dropped:
        out = out.select([i for i in range(len(out)) if i not in dropped])
    flags = out.with_format("arrow")[:]
    counts = {
        "rows": len(dataset),
        "prompts_truncated": pc.sum(flags["prompt_truncated"]).as_py() or 0,
        "completions_truncated": pc.sum(flags["completions_truncated"]).as_py() or 0,
        "dropped": len(dropped),
    }
    return out, counts, dropped


def tokenize_split(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    max_length: int,
    max_prompt_length: int,
    keep_end: bool,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """`tokenize_rows` for a split of any format, keeping only the rows' ids and the counts."""
    layout, chat = detect_format(dataset, where, tokenizer)
    out, counts, _ = tokenize_rows(
        dataset, tokenizer, where, layout, chat, max_length, max_prompt_length, keep_end, num_proc
    )
    return out.select_columns(ID_COLUMNS), counts


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    layout: Layout,
    chat: bool,
    max_length: int,
    max_prompt_length: int,
    keep_end: bool,
) -> dict[str, list]:
    """Rows -> token ids, one output row per input row; a row that cannot be tokenized gets
    empty ids and its `problem`, so the caller can name it."""
    texts, problems = [], []
    for values in zip(*batch.values(), strict=True):
        try:
            texts.append(render(layout, chat, dict(zip(batch, values, strict=True)), tokenizer))
            problems.append("")
        except RowProblem as err:
            texts.append(("", "", ""))
            problems.append(str(err))
    prompts, chosens, rejecteds = (list(column) for column in zip(*texts, strict=True))
    # Chat-template text already holds BOS and the turn markers: add nothing to it.
    prompt_ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
    chosen_ids = tokenizer(chosens, add_special_tokens=False)["input_ids"]
    if layout == "completion":  # chosen = rejected: tokenize once
        rejected_ids = chosen_ids
    else:
        rejected_ids = tokenizer(rejecteds, add_special_tokens=False)["input_ids"]

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: dict[str, list] = {c: [] for c in _TOKENIZED}
    for p, c, r, problem in zip(prompt_ids, chosen_ids, rejected_ids, problems, strict=True):
        fitted = None
        if not problem:
            if bos is not None and p[:2] == [bos, bos]:  # the text began with BOS and got another
                p = p[1:]
            c, r = (ids if ids[-1:] == [eos] else ids + [eos] for ids in (c, r))
            fitted = fit_row(p, c, r, max_length, max_prompt_length, keep_end, bos)
            if fitted is None:
                problem = (
                    f"prompt too long: no room for a completion within max_length={max_length} "
                    f"(prompts are cut to max_prompt_length={max_prompt_length} first)"
                )
        p2, c2, r2 = fitted or ([], [], [])
        out["prompt_input_ids"].append(p2)
        out["chosen_input_ids"].append(c2)
        out["rejected_input_ids"].append(r2)
        out["prompt_truncated"].append(fitted is not None and len(p2) < len(p))
        out["completions_truncated"].append(
            0 if fitted is None else (len(c2) < len(c)) + (len(r2) < len(r))
        )
        out["problem"].append(problem)
    return out


def render(
    layout: Layout, chat: bool, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str, str]:
    """The (prompt, chosen, rejected) texts of a checked row; a completion row's completion is
    both chosen and rejected.

    Completions lose trailing whitespace, so a chat turn rendered as "...</s>\\n" ends on EOS.
    """
    if layout == "implicit":
        split = split_message_prompt if chat else split_text_prompt
        prompt, *completions = split(row["chosen"], row["rejected"])
    elif layout == "completion":
        prompt, completions = row["prompt"], [row["completion"]]
    else:
        prompt, completions = row["prompt"], [row["chosen"], row["rejected"]]
    if chat:
        prompt, completions = render_chat(prompt, completions, tokenizer)
    return prompt, completions[0].rstrip(), completions[-1].rstrip()


def render_chat(
    prompt: list, completions: list[list], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, list[str]]:
    """Messages -> texts: the prompt with its generation prompt ("<|assistant|>"), and each
    completion as what the template adds after it (the turn, with its end-of-turn token)."""
    try:
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        full = [tokenizer.apply_chat_template(prompt + c, tokenize=False) for c in completions]
    except jinja2.TemplateError as err:  # e.g. a template's own "roles must alternate"
        raise RowProblem(f"the chat template refuses it: {err}") from err
    if not all(text.startswith(prompt_text) for text in full):
        raise RowProblem(
            "the chat template does not render the prompt (with generation prompt) as a prefix "
            "of prompt + completion, so the completion cannot be cut out"
        )
    return prompt_text, [text[len(prompt_text) :] for text in full]


def fit_row(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    max_length: int,
    max_prompt_length: int,
    keep_end: bool,
    bos: int | None,
) -> tuple[list[int], list[int], list[int]] | None:
    """Truncate a row to `max_length` tokens of prompt + (longer) completion; None if it cannot fit.

    Only a row that is too long is cut: its prompt to `max_prompt_length` tokens (keep_end keeps
    the last ones after a leading BOS, keep_start the first ones), then both completions to the
    room left.
    """
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected
    if len(prompt) > max_prompt_length:
        if not keep_end:
            prompt = prompt[:max_prompt_length]
        else:  # models saw BOS first in training: keep it even when keeping the end
            head = (
                prompt[:1] if bos is not None and prompt[0] == bos and max_prompt_length > 1 else []
            )
            prompt = head + prompt[len(prompt) - max_prompt_length + len(head) :]
    room = max_length - len(prompt)
    if room < 1:
        return None
    return prompt, chosen[:room], rejected[:room]


# ------------------------------------------------------------------------------------- collate


def collate_pairs(
    rows: list[dict[str, list[int]]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    packing: bool = False,
) -> dict[str, torch.Tensor]:
    """Stack B pairs into one batch of 2B rows, right-padded to the longest row.

    Returns `input_ids`, `attention_mask` and `labels`, each (2B, T) int64: rows 0..B-1 are
    prompt+chosen, rows B..2B-1 prompt+rejected, pair i in rows i and B+i, so one forward pass
    serves both. `labels` equal `input_ids` on completion tokens and IGNORE_INDEX on prompt and
    padding; they are not shifted (the log-prob code shifts). `index` (B,) holds each pair's
    row in its split, when the rows carry one.

    packing: the 2B sequences side by side instead, as few rows of the longest one's width as
    hold them all (first fit, longest first): `input_ids`, `labels`, `position_ids` (restarting
    at 0 for every sequence) and `row_ids` (which of the 2B sequences each token belongs to, -1
    on padding), each (R, T) with R <= 2B, and `n_rows` = 2B; no `attention_mask`. Attention
    stays within each sequence (transformers reads the restarts in `position_ids`), costs R T^2
    rather than (2B T)^2 for one long row, and little compute goes to padding.
    """
    sequences = [(r["prompt_input_ids"], r["chosen_input_ids"]) for r in rows]
    sequences += [(r["prompt_input_ids"], r["rejected_input_ids"]) for r in rows]
    batch = {}
    if "index" in rows[0]:
        batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    T = max(len(p) + len(c) for p, c in sequences)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of
    if packing:
        return batch | _pack(sequences, pad_token_id, width=T)
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    labels = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, : n + m] = 1
        labels[i, n : n + m] = torch.tensor(completion, dtype=torch.long)
    return batch | {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pack(
    sequences: list[tuple[list[int], list[int]]], pad_token_id: int, width: int
) -> dict[str, torch.Tensor | int]:
    """(prompt, completion) sequences -> rows of `width` tokens (at least the longest
    sequence), each holding as many sequences as fit (first fit, longest first), its padding a
    segment of its own."""
    lengths = [len(p) + len(c) for p, c in sequences]
    rows: list[list[int]] = []  # sequence indices in each row
    room: list[int] = []
    for i in sorted(range(len(sequences)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([])
            room.append(width)
            fit = len(rows) - 1
        rows[fit].append(i)
        room[fit] -= lengths[i]
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    row_ids = torch.full(shape, -1, dtype=torch.long)  # -1: padding
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            (prompt, completion), n = sequences[i], lengths[i]
            input_ids[r, at : at + n] = torch.tensor(prompt + completion)
            labels[r, at + len(prompt) : at + n] = torch.tensor(completion)
            position_ids[r, at : at + n] = torch.arange(n)
            row_ids[r, at : at + n] = i
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # padding: a segment that restarts
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "row_ids": row_ids,
        "n_rows": len(sequences),
    }


class LengthGroupedSampler(DistributedSampler):
    """DistributedSampler's seeded shuffle, then each run of `group` indices (of this rank's
    share) ordered longest first, so that batches hold rows of similar length."""

    def __init__(self, dataset: datasets.Dataset, group: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.group = group
        self.lengths = [
            len(p) + max(len(c), len(r))
            for p, c, r in zip(*(dataset[c] for c in ID_COLUMNS), strict=True)
        ]

    def __iter__(self):
        indices = list(super().__iter__())
        for i in range(0, len(indices), self.group):
            yield from sorted(indices[i : i + self.group], key=lambda j: -self.lengths[j])
