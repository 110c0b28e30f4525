"""Preference pairs from files, the Hub or memory: load -> validate -> tokenize -> collate.

Every rule about what a row may hold and how it becomes tokens lives in this package, one job a
file, each importing only the ones before it:

- `files`: data files read by us, on failure paths: the line at fault, where each row is;
- `sources`: splits from the Hub, a file, a directory of split files or memory;
- `values`: what one field may hold (text, or {role, content} messages);
- `formats`: the row formats (pair, conversation, implicit prompt, completion), one class each,
  and their registry: `register_format` adds one;
- `columns`: a format read under the user's column names (`columns`), which-is-better labels;
- `validation`: the bad-row policy (`on_bad_rows`) and the rejects file;
- `tokenize`: rows -> token ids (chat template, BOS once, EOS once, truncation);
- `prepare`: one split from rows to tokens, with its counts;
- `collate`: batches, packing, length-grouped sampling;
- `module`: `PreferenceDataModule`, all of the above for a Trainer.
"""

from lit_dpo.data.collate import LengthGroupedSampler, collate_pairs, collate_sequences
from lit_dpo.data.columns import Mapped
from lit_dpo.data.files import file_problem, row_labels
from lit_dpo.data.formats import (
    FORMATS,
    Format,
    detect_format,
    identical_problem,
    register_format,
    split_message_prompt,
    split_text_prompt,
)
from lit_dpo.data.module import PreferenceDataModule
from lit_dpo.data.sources import load_splits, resolve_splits
from lit_dpo.data.tokenize import (
    ID_COLUMNS,
    RowProblem,
    fit_row,
    render,
    render_chat,
    tokenize_completions,
    tokenize_rows,
    tokenize_split,
)
from lit_dpo.data.validation import count_problems, describe_bad_rows, find_bad_rows
from lit_dpo.data.values import ROLES, field_problem
from lit_dpo.logps import IGNORE_INDEX

__all__ = [
    "FORMATS",
    "ID_COLUMNS",
    "IGNORE_INDEX",
    "ROLES",
    "Format",
    "LengthGroupedSampler",
    "Mapped",
    "PreferenceDataModule",
    "RowProblem",
    "collate_pairs",
    "collate_sequences",
    "count_problems",
    "describe_bad_rows",
    "detect_format",
    "field_problem",
    "file_problem",
    "find_bad_rows",
    "fit_row",
    "identical_problem",
    "load_splits",
    "register_format",
    "render",
    "render_chat",
    "resolve_splits",
    "row_labels",
    "split_message_prompt",
    "split_text_prompt",
    "tokenize_completions",
    "tokenize_rows",
    "tokenize_split",
]
