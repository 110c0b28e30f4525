"""Checked rows -> token ids, by the same rules everywhere (training, SFT, reward scoring).

- prompt and completions are tokenized separately, so the chosen and rejected rows of a pair
  share the very same prompt tokens;
- BOS appears once: plain prompts get the tokenizer's special tokens (minus a second BOS when the
  text already starts with one); chat-template text already holds its specials and gets none;
- EOS ends each completion exactly once (not appended when the rendered turn already ends with it);
- a row longer than `max_length` first has its prompt cut to `max_prompt_length`, then its
  completions cut to the room left; every cut is counted (`PreferenceDataModule.stats`). A row
  whose prompt leaves no room for one completion token (possible only when `max_prompt_length
  >= max_length`), or a pair whose chosen and rejected tokens are the same once cut (they
  differed only past `max_length`: a tie, which trains nothing), is a bad row, handled by
  `on_bad_rows` like the others. `max_length=None` never cuts;
- an empty answer (one side of a pair may say nothing: Anthropic-HH has a few) is EOS alone,
  and counted (`empty_completions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import jinja2
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from lit_dpo.data.formats import Format, detect_format
from lit_dpo.data.values import is_empty

ID_COLUMNS = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
_TOKENIZED = datasets.Features(
    {c: datasets.Sequence(datasets.Value("int32")) for c in ID_COLUMNS}
    | {
        "prompt_truncated": datasets.Value("bool"),
        "completions_truncated": datasets.Value("int8"),
        "empty_completions": datasets.Value("int8"),  # answers that say nothing: EOS alone
        "problem": datasets.Value("string"),  # "" unless the row could not be tokenized
    }
)


class RowProblem(ValueError):
    """A problem with one row that only tokenization reveals; handled by `on_bad_rows`."""


def tokenize_rows(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    fmt: Format,
    chat: bool,
    max_length: int | None,
    max_prompt_length: int | None,
    keep_end: bool,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int], dict[int, str]]:
    """Tokenize one split of checked rows (see `find_bad_rows`).

    Returns the tokenized rows (`ID_COLUMNS` and the truncation flags), the counts (rows,
    prompts_truncated, completions_truncated, empty_completions, dropped) and {row index:
    problem} for the rows left out: a prompt leaving no room for a completion, a pair tied once
    cut, or a conversation the chat template refuses or renders without the prompt as a prefix.

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
            fmt=fmt,
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
        "empty_completions": pc.sum(flags["empty_completions"]).as_py() or 0,
        "dropped": len(dropped),
    }
    return out, counts, dropped


def tokenize_split(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    where: str,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    keep_end: bool = True,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """`tokenize_rows` for a split of any format, keeping only the rows' ids and the counts.

    Rows are not validated first. max_length None: never truncate; max_prompt_length None:
    never cut the prompt. A completion row's completion ids are both `chosen_input_ids` and
    `rejected_input_ids`.
    """
    fmt, chat = detect_format(dataset, where, tokenizer)
    out, counts, _ = tokenize_rows(
        dataset, tokenizer, where, fmt, chat, max_length, max_prompt_length, keep_end, num_proc
    )
    return out.select_columns(ID_COLUMNS), counts


def tokenize_completions(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list],
    completions: Sequence[str | list],
    where: str = "(prompt, completion) rows",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    keep_end: bool = True,
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of each (prompt, completion), tokenized as a `completion`
    row of PreferenceDataModule is (chat template, BOS once, EOS once). Never truncates unless
    given `max_length`.

    Prompts and completions are both strings (plain text) or both message lists (chat
    template). Raises ValueError naming the first row that cannot be tokenized.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        return [], []
    rows = datasets.Dataset.from_dict({"prompt": list(prompts), "completion": list(completions)})
    fmt, chat = detect_format(rows, where, tokenizer)
    out, _, dropped = tokenize_rows(
        rows, tokenizer, where, fmt, chat, max_length, max_prompt_length, keep_end
    )
    if dropped:
        i = min(dropped)
        raise ValueError(
            f"{where}: {len(dropped)} of {len(rows)} rows could not be tokenized; "
            f"row {i + 1}: {dropped[i]}"
        )
    ids = out.select_columns(["prompt_input_ids", "chosen_input_ids"]).to_dict()
    return ids["prompt_input_ids"], ids["chosen_input_ids"]


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    fmt: Format,
    chat: bool,
    max_length: int | None,
    max_prompt_length: int | None,
    keep_end: bool,
) -> dict[str, list]:
    """Rows -> token ids, one output row per input row; a row that cannot be tokenized gets
    empty ids and its `problem`, so the caller can name it."""
    texts, problems, empties = [], [], []
    for values in zip(*batch.values(), strict=True):
        prompt, completions = fmt.split(dict(zip(batch, values, strict=True)), chat)
        empties.append(sum(map(is_empty, completions)))
        try:
            texts.append(_render(prompt, completions, chat, tokenizer))
            problems.append("")
        except RowProblem as err:
            texts.append(("", "", ""))
            problems.append(str(err))
    prompts, chosens, rejecteds = (list(column) for column in zip(*texts, strict=True))
    # Chat-template text already holds BOS and the turn markers: add nothing to it.
    prompt_ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
    chosen_ids = tokenizer(chosens, add_special_tokens=False)["input_ids"]
    if rejecteds == chosens:  # one completion per row (chosen = rejected): tokenize once
        rejected_ids = chosen_ids
    else:
        rejected_ids = tokenizer(rejecteds, add_special_tokens=False)["input_ids"]

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out: dict[str, list] = {c: [] for c in _TOKENIZED}
    rows = zip(prompt_ids, chosen_ids, rejected_ids, problems, empties, strict=True)
    for p, c, r, problem, empty in rows:
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
            elif fmt.pairs and fitted[1] == fitted[2]:  # a tie: the pair would teach nothing
                problem = _tie(fmt.answers, c == r, max_length)
                fitted = None
        p2, c2, r2 = fitted or ([], [], [])
        out["prompt_input_ids"].append(p2)
        out["chosen_input_ids"].append(c2)
        out["rejected_input_ids"].append(r2)
        out["prompt_truncated"].append(fitted is not None and len(p2) < len(p))
        out["completions_truncated"].append(
            0 if fitted is None else (len(c2) < len(c)) + (len(r2) < len(r))
        )
        out["empty_completions"].append(0 if fitted is None else empty)
        out["problem"].append(problem)
    return out


def _tie(answers: list[str], before_truncation: bool, max_length: int | None) -> str:
    """The problem of a pair whose two answers are the same tokens (named as the row names them:
    'chosen' and 'rejected', or the user's `columns`)."""
    both = f"{answers[0]!r} and {answers[1]!r}"
    if before_truncation:
        return f"{both} are different texts but the same tokens"
    return (
        f"{both} are identical after truncation to max_length={max_length}: raise max_length "
        f"(or lower max_prompt_length) so that the tokens where they differ fit"
    )


def render(
    fmt: Format, chat: bool, row: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str, str]:
    """The (prompt, chosen, rejected) texts of a checked row; a row with one completion has it
    as both chosen and rejected.

    Completions lose trailing whitespace, so a chat turn rendered as "...</s>\\n" ends on EOS.
    """
    return _render(*fmt.split(row, chat), chat, tokenizer)


def _render(
    prompt: str | list, completions: list, chat: bool, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, str, str]:
    if chat:
        prompt, completions = render_chat(prompt, completions, tokenizer)
    return prompt, completions[0].rstrip(), completions[-1].rstrip()


def chat_template_text(template: str) -> str:
    """A chat template given as Jinja text ("{% for m in messages %}...") or as the path of a
    file holding it (a `.jinja` file, as tokenizers ship `chat_template.jinja`)."""
    if "{{" in template or "{%" in template:
        return template
    path = Path(template).expanduser()
    if not path.is_file():
        raise ValueError(
            f"chat_template: {template!r} is neither a Jinja template (no '{{{{' or '{{%') nor "
            f"a file"
        )
    return path.read_text(encoding="utf-8")


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
    max_length: int | None,
    max_prompt_length: int | None,
    keep_end: bool,
    bos: int | None,
) -> tuple[list[int], list[int], list[int]] | None:
    """Truncate a row to `max_length` tokens of prompt + (longer) completion; None if it cannot fit.

    Only a row that is too long is cut: its prompt to `max_prompt_length` tokens (keep_end keeps
    the last ones after a leading BOS, keep_start the first ones), then both completions to the
    room left. max_length None: never cut; max_prompt_length None: never cut the prompt.
    """
    if max_length is None or len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
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
