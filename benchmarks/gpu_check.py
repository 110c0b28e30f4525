"""One GPU, every reference strategy, a ~1B Llama: tokens/s, peak memory and MFU, no network.

A randomly initialised Llama-shaped model (hidden 2048, 22 layers, 32 heads, 8 kv heads,
intermediate 5632, vocab 32000: TinyLlama-1.1B's shape, 1.1B parameters) is saved
to a temporary directory with the tests' local tokenizer. Each strategy then trains --warmup +
--steps DPO steps on it (default 3 + 10) in a fresh process of its own: Trainer precision
bf16-true, weights loaded in bf16, sdpa attention, AdamW, 8 pairs x 1024 tokens of random words
per step (every row is cut to exactly 1024 tokens: 256 of prompt, 768 of completion). Expected
to take a few minutes on an H100, mostly process starts and model loads.

Per strategy (only the timed steps count):

- tokens/s: real (unpadded) tokens of the chosen and rejected rows per second;
- peak GiB: torch.cuda.max_memory_allocated during the steps (the setup's peak: loading,
  precomputing, is `cuda_setup_peak_gib` in the JSON);
- MFU: model FLOPs per second / --peak_tflops (default 989: H100 or H200 SXM, dense bf16).
  Model FLOPs per token: 6N for the policy (forward 2N, backward 4N; 4N with LoRA, whose frozen
  weights get no gradient) plus 2N for a reference forward run during training (copy, separate,
  adapter; none for precomputed and reference_free). N counts every parameter but the input
  embedding (a lookup); attention's own T-dependent FLOPs and recomputation are not counted.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --tiny     # CPU: a 2-layer Llama, fp32, 2 steps

Besides torch, lightning, transformers and peft, lit_dpo needs datasets, torchdata and
jsonargparse wherever this runs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # also as `python -m benchmarks.gpu_check`
from memory import STRATEGIES as KNOWN_STRATEGIES  # noqa: E402
from memory import markdown_table, parse_strategies, run_isolated, save_tiny_model  # noqa: E402

STRATEGIES = ("copy", "precomputed", "adapter", "reference_free")
LLAMA_1B = dict(
    hidden_size=2048,
    num_hidden_layers=22,  # TinyLlama-1.1B's shape
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=5632,
    vocab_size=32000,  # the tokenizer has ~300 tokens: every id is still in range
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def save_llama_1b(path: str) -> str:
    """LLAMA_1B with random weights, saved in bf16, with the tests' tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import build_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B), dtype=torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def param_counts(path: str) -> tuple[int, int]:
    """All parameters, and N: those that multiply each token (all but an untied input
    embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    tied = config.tie_word_embeddings
    return total, total - (0 if tied else model.get_input_embeddings().weight.numel())


def flops_per_token(strategy: str, n: int) -> int:
    base = strategy.partition("+")[0]
    policy = 4 if base == "adapter" else 6  # frozen weights: backward is 2N, not 4N
    reference = 2 if base in ("copy", "separate", "adapter") else 0  # a forward per step
    return (policy + reference) * n


def write_random_pairs(path: Path, rows: int, prompt_words: int, completion_words: int) -> str:
    """Pairs of random words, each word at least one token, so that with prompt_words >=
    max_prompt_length and completion_words >= max_length every row is cut to max_length."""
    from conftest import CORPUS

    rng = random.Random(0)
    words = sorted({w for line in CORPUS for w in line.split()})

    def text(k: int) -> str:
        return " ".join(rng.choices(words, k=k))

    pairs = (
        {
            "prompt": text(prompt_words),
            "chosen": text(completion_words),
            "rejected": text(completion_words),
        }
        for _ in range(rows)
    )
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, the tests' 2-layer Llama, fp32")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    p.add_argument("--batch_size", type=int, default=8, help="preference pairs per step")
    p.add_argument("--max_length", type=int, default=1024, help="tokens per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the chip's dense bf16 peak")
    p.add_argument("--out", help="write every result here as JSON")
    args = p.parse_args()
    if args.tiny:
        args.batch_size, args.max_length, args.warmup, args.steps = 2, 64, 1, 1
    strategies = parse_strategies(args.strategies, KNOWN_STRATEGIES)

    with tempfile.TemporaryDirectory(prefix="lit-dpo-gpu-check-") as workdir:
        save = save_tiny_model if args.tiny else save_llama_1b
        model = save(f"{workdir}/model")
        total, n = param_counts(model)
        prompt_length = args.max_length // 4
        spec = {
            "model": model,
            "data": write_random_pairs(
                Path(workdir) / "pairs.jsonl",
                rows=(args.warmup + args.steps) * args.batch_size,
                prompt_words=prompt_length,
                completion_words=args.max_length,
            ),
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "max_prompt_length": prompt_length,
            "warmup": args.warmup,
            "steps": args.steps,
            "accelerator": "cpu" if args.tiny else "gpu",
            "precision": "32-true" if args.tiny else "bf16-true",
            "torch_dtype": None if args.tiny else "bfloat16",
            "attn_implementation": "sdpa",
            "threads": 2 if args.tiny else None,
            "cache_dir": f"{workdir}/reference-cache",
            "workdir": workdir,
        }
        results = []
        for name in strategies:
            r = run_isolated(spec | {"strategy": name})
            if "tokens_per_s" in r:
                on_gpu = r["cuda_peak_gib"] is not None
                r["peak_gib"] = r["cuda_peak_gib"] if on_gpu else r["peak_rss_gib"]
                r["flops_per_token"] = flops_per_token(name, n)
                r["mfu"] = r["flops_per_token"] * r["tokens_per_s"] / (args.peak_tflops * 1e12)
            results.append(r)

    ran = [r for r in results if "mfu" in r]
    device = ran[0]["device"] if ran else "?"
    peak = "torch.cuda.max_memory_allocated" if ran and ran[0]["cuda_peak_gib"] else "peak RSS"
    print(
        f"\n{device}; {total:,} parameters, N = {n:,} without the input embedding; "
        f"{args.batch_size} pairs x {args.max_length} tokens, {args.warmup} warm-up + "
        f"{args.steps} timed steps; {spec['precision']}; peak GiB = {peak}; "
        f"MFU against {args.peak_tflops:g} TFLOP/s\n"
    )
    rows = [
        [r["strategy"], f"{r['tokens_per_s']:,.0f}", f"{r['median_step_s']:.3f}",
         f"{r['peak_gib']:.2f}", f"{100 * r['mfu']:.1f}%"]
        if "mfu" in r
        else [r["strategy"], "skipped" if "skipped" in r else "failed", "", "", ""]
        for r in results
    ]  # fmt: skip
    print(markdown_table(["strategy", "tokens/s", "s/step", "peak GiB", "MFU"], rows))
    if args.out:
        summary = {"args": vars(args), "device": device, "params": total, "flop_params": n}
        Path(args.out).write_text(json.dumps(summary | {"results": results}, indent=1))


if __name__ == "__main__":
    main()
