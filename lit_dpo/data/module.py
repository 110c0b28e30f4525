"""PreferenceDataModule: sources -> formats -> validation -> tokenize -> collate, for a Trainer."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from lit_dpo.data.collate import LengthGroupedSampler, collate_pairs
from lit_dpo.data.columns import check_columns
from lit_dpo.data.formats import FORMATS
from lit_dpo.data.prepare import COUNTS, prepare_split, summary
from lit_dpo.data.sources import load_splits, resolve_splits
from lit_dpo.data.tokenize import ID_COLUMNS, chat_template_text
from lit_dpo.data.validation import write_rejects
from lit_dpo.hub import load_tokenizer
from lit_dpo.utils import pad_token_id

_SPLIT_ARGS = {"train": "train_split", "validation": "val_split", "test": "test_split"}


class PreferenceDataModule(L.LightningDataModule):
    """Pairs of (prompt, chosen, rejected) completions, tokenized once and batched for DPO.

    Each batch holds `input_ids`, `attention_mask` and `labels` of shape (2B, T): rows 0..B-1
    are prompt+chosen, rows B..2B-1 prompt+rejected (see `collate_pairs`).

    Rows are standard (`prompt`, `chosen`, `rejected` strings), conversational (the same fields
    as lists of `{role, content}` messages, rendered with the tokenizer's chat template),
    implicit-prompt (only `chosen` and `rejected`, strings or messages, whose shared beginning is
    the prompt), or completions (`prompt` and `completion`, strings or messages, no pair: for
    SFT). A completion row is tokenized as if chosen = rejected = completion, so batches keep
    their layout and an SFT step uses rows 0..B-1. UltraFeedback-binarized rows (a `prompt`
    string, `chosen`/`rejected` whole conversations that hold it) are read as they are. Other
    columns are ignored; columns under other names are read through `columns`. One split holds
    one format: the first row's decides; after `setup`, `formats` names it per split and `pairs`
    says whether every split holds pairs. One answer of a pair may be empty (the completion is
    then EOS alone: Anthropic-HH prefers silence to a harmful reply a few times); such answers
    are counted in `stats`.

    Args:
        dataset: A Hub dataset name, a local .json/.jsonl/.parquet/.csv file (.gz, .bz2, .xz
            or .zst too; its rows are the train split), a directory of such files (a file
            belongs to the split its name starts with: train.jsonl, validation.jsonl or
            val/valid/dev/eval.jsonl, test.jsonl, train-00000-of-00002.parquet; a data file
            named after no split is an error), `json`/`csv`/`parquet` with `data_files`, or an
            in-memory `datasets.Dataset` (the train split) or `datasets.DatasetDict`. CSV cells
            are read as text, as written ("4", "NA" and "" stay so).
        tokenizer: A tokenizer name or path (anything `lit_dpo.hub.resolve` accepts) or a
            tokenizer object. Required; the CLI fills in the model's name when it is unset.
            Without a pad token, batches are padded with EOS (padding is masked out anyway).
        tokenizer_revision: The version of a Hub tokenizer to load (branch, tag or commit hash);
            the CLI fills in `model.revision` when the tokenizer is the model's.
        dataset_config: The configuration (subset) name of a Hub dataset (`load_dataset`'s
            `name`).
        revision: The version of a Hub dataset to read: a branch, tag or commit hash (a commit
            pins the data of a run). None: the default branch.
        data_files: The files to read, as `datasets.load_dataset` takes them: paths in a Hub
            dataset's repository, in a local directory (relative to it), or, with `dataset:
            json` (csv, parquet), anywhere; globs allowed. A path or list: the train split; a
            mapping: {split: path(s)}, e.g. {train: data/train-*.parquet, test: data/test.jsonl}.
        columns: Your column names for the fields of the row formats, where they differ:
            {field: column}, e.g. StackExchange-paired {prompt: question, chosen: response_j,
            rejected: response_k}. `label` names a column saying which of two answers is better:
            1 (true) the `chosen` column's, 0 (false) the `rejected` column's (that row's pair
            is swapped): SHP {prompt: history, chosen: human_ref_A, rejected: human_ref_B,
            label: labels}; PKU-SafeRLHF {chosen: response_1, rejected: response_0, label:
            better_response_id}. Messages name your columns. None: the fields' own names.
        chat_template: A chat template to render conversational rows with, replacing the
            tokenizer's: Jinja text, or the path of a file holding it (e.g. `template.jinja`).
            None: the tokenizer's own.
        train_split: The split to train on. Data without a `train` split but with `train_prefs`
            (UltraFeedback-binarized ships train_prefs, test_prefs, train_sft, ...) trains on
            `train_prefs` (and tests on `test_prefs`), and says so in the log.
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
            sequence only), so little compute goes to padding. `auto` (default): packed whenever
            a batch packs into fewer rows and the LightningModule reads packed batches (its
            `packing_refusal` is None: DPOModule with sdpa, eager or flash attention), padded
            otherwise, so it never costs time; without a Trainer, padded. `true`: every batch
            packed (refused for a module that cannot read them). `false`: every batch padded.
        group_by_length: Unless packing is `true`: within each run of 64 batches of the (seeded)
            shuffle, order rows by length, so a batch holds rows of similar length and pads
            little. The order stays a function of (seed, epoch): resuming is still exact.
        num_workers: DataLoader worker processes.
        num_proc: Processes for validation and tokenization (`datasets.Dataset.map`); None: one.
        seed: Seed of the train shuffle and of the held-out validation split. None: the run's
            global seed (`seed_everything`, which sets `PL_GLOBAL_SEED`), or 42 when none is
            set. A resumed run must have the seed its checkpoint was trained with (it is
            checked).
        trust_remote_code: Allow custom code when loading the tokenizer.
        on_bad_rows: What to do with rows that cannot be trained on (an empty prompt, a
            missing field, chosen identical to rejected, a conversation not ending with the
            assistant, ...; every row is checked before training). `error`: stop before
            training with one message naming the file, split, rows and problems. `skip`: train
            on the rest, write each bad row with its reasons to `rejects_path`, and log how many
            rows had each problem (also kept in `stats`).
        rejects_path: The JSON Lines file the skipped rows go to. None: `rejects.jsonl` in the
            run's log directory (`trainer.log_dir`) when attached to a Trainer, else in the
            working directory. Written (replaced) only under `skip`.
    """

    def __init__(
        self,
        # os.PathLike: besides taking a Path, it stops jsonargparse from reading a file path
        # given on the command line as a config (a CSV file's text replaced its path).
        dataset: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        tokenizer_revision: str | None = None,
        dataset_config: str | None = None,
        revision: str | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        columns: dict[str, str] | None = None,
        chat_template: str | None = None,
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
        packing: bool | Literal["auto"] = "auto",
        group_by_length: bool = False,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int | None = None,
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
        if packing not in (True, False, "auto"):
            raise ValueError(f"packing must be true, false or auto, got {packing!r}")
        if on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows must be error or skip, got {on_bad_rows!r}")
        if columns:
            check_columns(columns)
        if chat_template is not None:
            chat_template_text(chat_template)  # a template, or a file that exists
            if not isinstance(tokenizer, str | None):  # set on our copy, not on yours
                tokenizer = copy.deepcopy(tokenizer)
        if isinstance(dataset, os.PathLike):
            dataset = os.fspath(dataset)  # before save_hyperparameters, which reads the locals
        # Settings live in self.hparams only. `dataset` and `tokenizer` are attributes too (a
        # tokenizer name gives way to the loaded tokenizer), and objects (an in-memory dataset, a
        # tokenizer) stay out of hparams: they do not belong in checkpoints.
        objects = {"dataset": dataset, "tokenizer": tokenizer}
        self.save_hyperparameters(
            ignore=[k for k, v in objects.items() if not isinstance(v, str | None)]
        )
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.test_dataset: datasets.Dataset | None = None
        self.stats: dict[str, dict[str, Any]] = {}  # per loaded split, see `Prepared`
        self.formats: dict[str, str] = {}  # {split: its format's name in FORMATS}, after setup
        self.splits: dict[str, str] = {}  # {role: the split read for it}, after setup
        self._where: dict[str, str] = {}  # {split: "<files>: split '<split>'"}, for messages
        self.rejects: list[dict[str, Any]] = []  # the skipped rows, see `Prepared`
        self.packing: bool | str = False  # what `collate` does: resolved by each loader
        self._packing_note: str | None = None

    # Settings other lit_dpo code reads (e.g. SentimentEval re-reads the test split's prompts).
    @property
    def dataset_config(self) -> str | None:
        return self.hparams.dataset_config

    @property
    def train_split(self) -> str:
        return self.hparams.train_split

    @property
    def test_split(self) -> str | None:
        return self.hparams.test_split

    @property
    def seed(self) -> int:
        """The data's seed: `seed`, else the global one `seed_everything` set, else 42."""
        if self.hparams.seed is not None:
            return self.hparams.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 42))

    def state_dict(self) -> dict[str, Any]:
        # In every checkpoint: a resumed run must shuffle (and hold out) with the same seed.
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data was shuffled with seed {state['seed']}, this run's with "
                f"{self.seed}: resume with --seed_everything {state['seed']} (or data.seed: "
                f"{state['seed']}) to see the same batches"
            )

    @property
    def eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    @property
    def pairs(self) -> bool:
        """Whether every split loaded (by `setup`) holds preference pairs, as DPO needs; False
        where one holds single completions (prompt/completion rows)."""
        return all(FORMATS[name].pairs for name in self.formats.values())

    def require_pairs(self) -> None:
        """Stop, in one line, when a loaded split holds no pairs (for DPOModule, after `setup`)."""
        for split, name in self.formats.items():
            if not FORMATS[name].pairs:
                raise ValueError(
                    f"{self._where[split]}: holds {FORMATS[name].summary} rows, not pairs: DPO "
                    f"needs pairs (prompt/chosen/rejected); use SFTModule for completions"
                )

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
        if self.hparams.on_bad_rows == "skip":
            rejects = self._rejects_file()  # on every rank: trainer.log_dir is a collective
            self._write_rejects(rejects)
        for role, split in self.splits.items():
            if split != (asked := self.hparams[_SPLIT_ARGS[role]]):
                rank_zero_info(
                    f"the data has no {asked!r} split: using {split!r} for {role} (set "
                    f"{_SPLIT_ARGS[role]} to choose another)"
                )
        for split, s in self.stats.items():
            for line in summary(split, s, rejects):
                rank_zero_info(line)
        if self.tokenizer.pad_token_id is None:
            rank_zero_info("the tokenizer has no pad token: batches are padded with EOS (masked)")
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None:  # the run's record keeps what was skipped and cut, per split
            logger.log_hyperparams(
                {f"data/{split}/{k}": s[k] for split, s in self.stats.items() for k in COUNTS}
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
        hp = self.hparams
        tokenizer = self._load_tokenizer()
        wanted = {role: hp[arg] for role, arg in _SPLIT_ARGS.items()}
        raw, sources = load_splits(
            self.dataset,
            hp.dataset_config,
            wanted,
            revision=hp.revision,
            data_files=hp.data_files,
        )
        wanted = resolve_splits(raw, wanted)  # train_prefs for train, ... (as load_splits did)
        self.splits = {r: s for r, s in wanted.items() if s is not None and s in raw}
        self.stats, self.rejects, self.formats, self._where = {}, [], {}, {}
        tokenized = {}
        for role, split in self.splits.items():
            prepared = prepare_split(
                raw[split],
                split,
                sources[split],
                tokenizer,
                columns=hp.columns,
                on_bad_rows=hp.on_bad_rows,
                max_length=hp.max_length,
                max_prompt_length=hp.max_prompt_length,
                keep_end=hp.truncation_mode == "keep_end",
                num_proc=hp.num_proc,
            )
            tokenized[role], self.stats[split] = prepared.rows, prepared.stats
            self.formats[split], self._where[split] = prepared.format, prepared.where
            self.rejects += prepared.rejects
        if "validation" not in tokenized and hp.val_split is not None and hp.val_fraction > 0:
            n, train = len(tokenized["train"]), self.splits["train"]
            if math.ceil(hp.val_fraction * n) >= n:  # datasets would refuse, less clearly
                raise ValueError(
                    f"{', '.join(sources[train])}: split {train!r}: too "
                    f"few rows ({n}) to hold out val_fraction={hp.val_fraction} for "
                    f"validation; add rows or a validation split, or set val_fraction: 0"
                )
            held_out = tokenized["train"].train_test_split(
                test_size=hp.val_fraction, seed=self.seed
            )
            tokenized["train"], tokenized["validation"] = held_out["train"], held_out["test"]
        return {role: data.select_columns(ID_COLUMNS) for role, data in tokenized.items()}

    def _rejects_file(self) -> Path:
        if self.hparams.rejects_path is not None:
            return Path(self.hparams.rejects_path)
        trainer = self.trainer
        log_dir = (trainer.log_dir or trainer.default_root_dir) if trainer is not None else None
        return Path(log_dir or os.getcwd()) / "rejects.jsonl"

    @rank_zero_only
    def _write_rejects(self, path: Path) -> None:
        write_rejects(path, self.rejects)

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError("PreferenceDataModule needs a tokenizer (a name, a path or an object)")
        if isinstance(self.tokenizer, str):
            hp = self.hparams
            revision = hp.tokenizer_revision
            self.tokenizer = load_tokenizer(self.tokenizer, hp.trust_remote_code, revision)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end completions with")
        if self.hparams.chat_template is not None:
            self.tokenizer.chat_template = chat_template_text(self.hparams.chat_template)
        return self.tokenizer

    def collate(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """`collate_pairs` with this module's padding settings."""
        return collate_pairs(
            rows,
            pad_token_id=pad_token_id(self.tokenizer),
            pad_to_multiple_of=self.hparams.pad_to_multiple_of,
            packing=self.packing,
        )

    def _resolve_packing(self) -> None:
        """`packing` as the attached LightningModule can read it (see the argument)."""
        packing, module = self.hparams.packing, None
        if self.trainer is not None:
            module = self.trainer.lightning_module
        if packing and module is not None:
            default = f"{type(module).__name__} does not say it reads packed batches"
            refusal = getattr(module, "packing_refusal", default)
            if refusal and packing == "auto":
                if refusal != self._packing_note:  # once per reason, not once per loader
                    rank_zero_info(f"data.packing=auto: padded batches, since {refusal}")
                self._packing_note, packing = refusal, False
            elif refusal:
                raise ValueError(f"data.packing=true, but {refusal}: set it to auto or false")
        self.packing = packing if module is not None or packing is True else False

    def _loader(self, dataset: datasets.Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # Resumable order: the shuffle is a function of (seed, epoch) alone (Lightning calls
        # `set_epoch`) and the stateful loader saves its position in the epoch in every
        # checkpoint, so a killed run resumed from its last checkpoint sees exactly the batches
        # it would have seen. Lightning keeps a DistributedSampler as it is, so it is sharded
        # across ranks here.
        hp = self.hparams
        shard = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        shard = shard or {"num_replicas": 1, "rank": 0}
        sampler = None
        self._resolve_packing()
        if shuffle and hp.group_by_length and hp.packing is not True:
            sampler = LengthGroupedSampler(dataset, 64 * batch_size, seed=self.seed, **shard)
        elif shuffle:
            sampler = DistributedSampler(dataset, seed=self.seed, **shard)
        if sampler is not None and self.trainer is not None:
            # A run resumed mid-epoch restores the loader's position before Lightning sets the
            # epoch: the sampler must already hold the restored epoch's order.
            sampler.set_epoch(self.trainer.current_epoch)
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning there is nothing to validate on.
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        if self.test_dataset is None:
            return []
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)
