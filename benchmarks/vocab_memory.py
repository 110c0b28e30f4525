"""Peak memory of one DPO-shaped forward + backward as the vocabulary grows: lit_dpo's
completion-only, chunked log-probs against the usual full-logits computation.

The model is a 2-layer Llama (hidden 64, so that weights stay small) whose vocabulary is the
only thing that changes; the batch is 8 rows x 128 tokens with 96 completion tokens each.
Memory is the rise of the process's resident set above its level before the step (Linux:
`/proc/self/clear_refs` resets the peak), measured after a warm-up step so that gradients
already exist. Weights and their gradients grow with the vocabulary in both columns alike; the
difference is the (rows, T, V) fp32 logits.

    python benchmarks/vocab_memory.py [--vocab 8192 32768 131072 262144]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from lit_dpo.logps import sequence_logps


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def naive_logps(model, batch):
    """Full logits, fp32 log-softmax over every position, gather, masked sum (what TRL does)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return (logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * keep).sum(1)


def step_peak_mb(model, batch, method: str) -> float:
    def step():
        model.zero_grad(set_to_none=False)
        logps = (
            sequence_logps(model, batch).sum if method == "lit_dpo" else naive_logps(model, batch)
        )
        logps.sum().backward()

    step()  # warm-up: gradients now exist
    before = rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step()
    return (rss_kb("VmHWM") - before) / 1024


def batch_for(vocab: int, rows: int = 8, length: int = 128, prompt: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 131072, 262144])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| vocabulary | lit_dpo peak rise MB | full logits peak rise MB | (rows, T, V) fp32 MB |")
    print("|---|---|---|---|")
    for vocab in args.vocab:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
        batch = batch_for(vocab)
        ours, full = (step_peak_mb(model, batch, m) for m in ("lit_dpo", "full"))
        logits_mb = batch["input_ids"].numel() * vocab * 4 / 2**20
        rows.append(
            {"vocab": vocab, "lit_dpo_mb": ours, "full_logits_mb": full, "logits_mb": logits_mb}
        )
        print(f"| {vocab:,} | {ours:,.0f} | {full:,.0f} | {logits_mb:,.0f} |", flush=True)
        del model
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
