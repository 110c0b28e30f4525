"""Preference pairs from files, the Hub or memory: load -> validate -> tokenize -> collate.

Every tokenization rule of lit_dpo lives here:

- prompt and completions are tokenized separately, so the chosen and rejected rows of a pair
  share the very same prompt tokens;
- BOS appears once: plain prompts get the tokenizer's special tokens (minus a second BOS when the
  text already starts with one); chat-template text already holds its specials and gets none;
- EOS ends each completion exactly once (not appended when the rendered turn already ends with it);
- a row longer than `max_length` first has its prompt cut to `max_prompt_length`, then its
  completions cut to the room left; a row with no room for one completion token is dropped, and
  every cut and drop is counted in `PreferenceDataModule.stats`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lit_dpo.hub import resolve

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there
ID_COLUMNS = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
_TOKENIZED = datasets.Features(
    {c: datasets.Sequence(datasets.Value("int32")) for c in ID_COLUMNS}
    | {"prompt_truncated": datasets.Value("bool"), "completions_truncated": datasets.Value("int8")}
)
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_HH_TURN = "\n\nAssistant:"  # Anthropic-HH: the prompt ends where the last answer starts

Format = Literal["standard", "conversational", "implicit", "implicit_conversational"]
_CHAT_FORMATS = ("conversational", "implicit_conversational")  # rendered by the chat template


class PreferenceDataModule(L.LightningDataModule):
    """Pairs of (prompt, chosen, rejected) completions, tokenized once and batched for DPO.

    Each batch holds `input_ids`, `attention_mask` and `labels` of shape (2B, T): rows 0..B-1
    are prompt+chosen, rows B..2B-1 prompt+rejected (see `collate_pairs`).

    Args:
        dataset: A Hub dataset name, a local .json/.jsonl/.parquet/.csv file (its rows are the
            train split), a directory of such files (a file belongs to the split its name
            starts with: train.jsonl, validation.jsonl, test.jsonl), or an in-memory
            `datasets.Dataset` (the train split) or `datasets.DatasetDict`. Rows are standard
            (`prompt`, `chosen`, `rejected` strings), conversational (lists of `{role, content}`
            messages, rendered with the tokenizer's chat template) or implicit-prompt (only
            `chosen` and `rejected`, whose shared beginning is the prompt). Other columns are
            ignored.
        tokenizer: A tokenizer name or path (anything `lit_dpo.hub.resolve` accepts) or a
            tokenizer object. Required; the CLI links it to the model's name.
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
        num_workers: DataLoader worker processes.
        num_proc: Processes for tokenization (`datasets.Dataset.map`); None: one.
        seed: Seed of the train shuffle and of the held-out validation split.
        trust_remote_code: Allow custom code when loading the tokenizer.
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
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 42,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_prompt_length < 1 or max_length < 1:
            raise ValueError("max_length and max_prompt_length must be positive")
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
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.test_dataset: datasets.Dataset | None = None
        self.stats: dict[str, dict[str, int]] = {}  # per loaded split, see `_build`

    def prepare_data(self) -> None:
        # Files and Hub data: tokenize here (local rank 0) so the map lands in the datasets
        # cache and `setup` on every rank only reads it. In-memory data has no cache.
        if isinstance(self.dataset, str):
            self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:  # fit, validate and test share one build
            return
        splits = self._build()
        for name, counts in self.stats.items():
            rank_zero_info(
                f"{name}: {counts['rows']} rows, {counts['prompts_truncated']} prompts truncated, "
                f"{counts['completions_truncated']} completions truncated, "
                f"{counts['dropped']} dropped (no room for a completion)"
            )
        self.train_dataset = splits["train"]
        self.val_dataset = splits.get("validation")
        self.test_dataset = splits.get("test")

    def _build(self) -> dict[str, datasets.Dataset]:
        """Load, validate and tokenize every split; hold out validation rows if needed.

        Returns {"train", and where present "validation", "test": tokenized dataset}, and fills
        `self.stats[split]` with rows / prompts_truncated / completions_truncated / dropped
        (completions count chosen and rejected separately; a held-out validation set is
        counted within its source split).
        """
        tokenizer = self._load_tokenizer()
        wanted = {"train": self.train_split, "validation": self.val_split, "test": self.test_split}
        raw, sources = load_splits(self.dataset, self.dataset_config, wanted)
        tokenized = {}
        for role, split in wanted.items():
            if split is None or split not in raw:
                continue
            where = f"{sources[split]}: split {split!r}"
            tokenized[role], self.stats[split] = tokenize_split(
                raw[split],
                tokenizer,
                where,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
                keep_end=self.truncation_mode == "keep_end",
                num_proc=self.num_proc,
            )
        if "validation" not in tokenized and self.val_split is not None and self.val_fraction > 0:
            held_out = tokenized["train"].train_test_split(
                test_size=self.val_fraction, seed=self.seed
            )
            tokenized["train"], tokenized["validation"] = held_out["train"], held_out["test"]
        return tokenized

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

    def _loader(self, dataset: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # No pad token: pad with EOS; padding is masked out of attention and labels anyway.
        pad = self.tokenizer.pad_token_id
        collate = functools.partial(
            collate_pairs,
            pad_token_id=self.tokenizer.eos_token_id if pad is None else pad,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=collate,
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
) -> tuple[datasets.DatasetDict, dict[str, str]]:
    """Load the splits named in `wanted` (role -> split name) that `source` has.

    Returns the splits and, per split, a label naming where its rows come from (for errors).
    A single file or Dataset is the train split.
    """
    train = wanted["train"]
    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({train: source})
    if isinstance(source, datasets.DatasetDict):
        label = "in-memory dataset"
        return _require_train(source, train, label), dict.fromkeys(source, label)
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
        return _require_train(raw, train, source), dict.fromkeys(raw, source)
    builders = {_BUILDERS[Path(f).suffix] for paths in files.values() for f in paths}
    if len(builders) > 1:
        raise ValueError(f"{source}: mixes file formats {sorted(builders)}; use one")
    raw = datasets.load_dataset(builders.pop(), data_files=files)
    return _require_train(raw, train, source), {s: ", ".join(f) for s, f in files.items()}


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


# ------------------------------------------------------------------------------------ validate


def detect_format(dataset: datasets.Dataset, where: str) -> Format:
    """Tell the row format from the columns and the first row."""
    for field in ("chosen", "rejected"):
        if field not in dataset.column_names:
            raise ValueError(f"{where}: missing column {field!r}; found {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{where}: no rows")
    first = dataset[0]
    if "prompt" not in dataset.column_names:
        return "implicit_conversational" if isinstance(first["chosen"], list) else "implicit"
    return "conversational" if isinstance(first["prompt"], list) else "standard"


def check_field(value: Any, messages: bool, where: str, field: str) -> None:
    """Raise a ValueError naming `where` and `field` unless `value` is a non-empty string or,
    with `messages`, a non-empty list of {role, content} dicts."""
    if value is None:
        raise ValueError(f"{where}: field {field!r} is missing")
    if messages:
        if not isinstance(value, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value
        ):
            raise ValueError(
                f"{where}: field {field!r} must be a list of {{role, content}} messages"
            )
    elif not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: field {field!r} is empty")


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


def tokenize_split(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    max_length: int,
    max_prompt_length: int,
    keep_end: bool,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Validate and tokenize one split; return it with only `ID_COLUMNS` and its counts.

    The map is cached on disk for file-backed datasets; its fingerprint hashes the function
    and all of `fn_kwargs` (tokenizer included), so changing any of them re-tokenizes.
    """
    fmt = detect_format(dataset, where)
    if fmt in _CHAT_FORMATS and not tokenizer.chat_template:
        raise ValueError(f"{where}: rows are conversational but the tokenizer has no chat template")
    out = dataset.map(
        _tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        features=_TOKENIZED,  # explicit, so that a split whose rows all drop still has columns
        desc=f"Tokenizing {where}",
        fn_kwargs=dict(
            tokenizer=tokenizer,
            fmt=fmt,
            where=where,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            keep_end=keep_end,
        ),
    )
    stats = {
        "rows": len(dataset),
        "prompts_truncated": sum(out["prompt_truncated"]),
        "completions_truncated": sum(out["completions_truncated"]),
        "dropped": len(dataset) - len(out),
    }
    return out.select_columns(ID_COLUMNS), stats


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    fmt: Format,
    where: str,
    max_length: int,
    max_prompt_length: int,
    keep_end: bool,
) -> dict[str, list]:
    """Rows -> token ids; rows that cannot fit are left out (the caller counts them)."""
    texts = [
        render(fmt, {k: v[i] for k, v in batch.items()}, tokenizer, f"{where} row {row}")
        for i, row in enumerate(indices)
    ]
    prompts, chosens, rejecteds = (list(column) for column in zip(*texts, strict=True))
    # Chat-template text already holds BOS and the turn markers: add nothing to it.
    prompt_ids = tokenizer(prompts, add_special_tokens=fmt not in _CHAT_FORMATS)["input_ids"]
    chosen_ids = tokenizer(chosens, add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer(rejecteds, add_special_tokens=False)["input_ids"]

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: dict[str, list] = {
        c: [] for c in [*ID_COLUMNS, "prompt_truncated", "completions_truncated"]
    }
    for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids, strict=True):
        if bos is not None and p[:2] == [bos, bos]:  # the text began with BOS and got another
            p = p[1:]
        c, r = (ids if ids[-1:] == [eos] else ids + [eos] for ids in (c, r))
        fitted = fit_row(p, c, r, max_length, max_prompt_length, keep_end, bos)
        if fitted is None:
            continue
        p2, c2, r2 = fitted
        out["prompt_input_ids"].append(p2)
        out["chosen_input_ids"].append(c2)
        out["rejected_input_ids"].append(r2)
        out["prompt_truncated"].append(len(p2) < len(p))
        out["completions_truncated"].append((len(c2) < len(c)) + (len(r2) < len(r)))
    return out


def render(fmt: Format, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str):
    """Validate one row and return its (prompt, chosen, rejected) texts.

    Completions lose trailing whitespace, so a chat turn rendered as "...</s>\\n" ends on EOS.
    """
    fields = (
        ("chosen", "rejected") if fmt.startswith("implicit") else ("prompt", "chosen", "rejected")
    )
    for field in fields:
        check_field(row[field], fmt in _CHAT_FORMATS, where, field)
    if fmt == "standard":
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    elif fmt == "implicit":
        prompt, chosen, rejected = split_text_prompt(row["chosen"], row["rejected"])
        if not prompt:
            raise ValueError(f"{where}: 'chosen' and 'rejected' share no prefix to use as prompt")
    elif fmt == "implicit_conversational":
        messages = split_message_prompt(row["chosen"], row["rejected"])
        for field, value in zip(("prompt", "chosen", "rejected"), messages, strict=True):
            if not value:
                raise ValueError(f"{where}: no {field} messages left around the shared prompt")
        prompt, chosen, rejected = render_chat(*messages, tokenizer, where)
    else:
        prompt, chosen, rejected = render_chat(
            row["prompt"], row["chosen"], row["rejected"], tokenizer, where
        )
    return prompt, chosen.rstrip(), rejected.rstrip()


def render_chat(
    prompt: list, chosen: list, rejected: list, tokenizer: PreTrainedTokenizerBase, where: str
) -> tuple[str, str, str]:
    """Messages -> texts: the prompt with its generation prompt ("<|assistant|>"), and each
    completion as what the template adds after it (the turn, with its end-of-turn token)."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    completions = []
    for completion in (chosen, rejected):
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(
                f"{where}: the chat template does not render the prompt (with generation prompt) "
                f"as a prefix of prompt + completion, so the completion cannot be cut out"
            )
        completions.append(full[len(prompt_text) :])
    return prompt_text, *completions


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
    rows: list[dict[str, list[int]]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack B pairs into one batch of 2B rows, right-padded to the longest row.

    Returns `input_ids`, `attention_mask` and `labels`, each (2B, T) int64: rows 0..B-1 are
    prompt+chosen, rows B..2B-1 prompt+rejected, pair i in rows i and B+i, so one forward pass
    serves both. `labels` equal `input_ids` on completion tokens and IGNORE_INDEX on prompt and
    padding; they are not shifted (the log-prob code shifts).
    """
    sequences = [(r["prompt_input_ids"], r["chosen_input_ids"]) for r in rows]
    sequences += [(r["prompt_input_ids"], r["rejected_input_ids"]) for r in rows]
    T = max(len(p) + len(c) for p, c in sequences)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    labels = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, : n + m] = 1
        labels[i, n : n + m] = torch.tensor(completion, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
