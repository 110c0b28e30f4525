"""benchmarks/gpu_check.py and benchmarks/memory.py run end to end on the tests' 2-layer Llama
(CPU, one fresh process per strategy) and report sane numbers.

A strategy may be skipped only when DPOModule really lacks what it needs. At step 0 the policy
equals its reference, so every fp32 strategy with a reference logs the loss ln 2.
"""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import write_jsonl
from lit_dpo import module

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(tmp_path: Path, script: str, *args: str) -> tuple[list[dict], dict, str]:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    accepted = inspect.signature(module.DPOModule).parameters
    for r in summary["results"]:
        assert "error" not in r, r["error"]
        if "skipped" in r:
            assert r["missing"] and not any(
                name in accepted or hasattr(module, name) for name in r["missing"]
            ), r
        assert f"| {r['strategy']} |" in proc.stdout  # a row of the markdown table
    ran = {r["strategy"]: r for r in summary["results"] if "skipped" not in r}
    return ran, summary, proc.stdout


def test_gpu_check_tiny(tmp_path):
    ran, summary, _ = run_script(tmp_path, "gpu_check.py", "--tiny")
    assert [r["strategy"] for r in summary["results"]] == [
        "copy", "precomputed", "adapter", "reference_free",
    ]  # fmt: skip
    assert {"copy", "reference_free"} <= ran.keys()
    n = summary["flop_params"]
    assert 0 < n < summary["params"]
    for name, r in ran.items():
        assert r["tokens_per_step"] == [2 * 2 * 64] * 2  # 2 pairs x 2 rows x 64, no padding
        assert r["tokens_per_s"] > 0 and r["median_step_s"] > 0 and r["peak_gib"] > 0
        assert r["flops_per_token"] == {"copy": 8, "adapter": 6}.get(name, 6) * n
        assert r["mfu"] == r["flops_per_token"] * r["tokens_per_s"] / 989e12
        assert math.isfinite(r["loss"])
        if name != "reference_free":
            assert abs(r["loss"] - math.log(2)) < 1e-3
    if "adapter" in ran:
        assert 0 < ran["adapter"]["trainable_params"] < ran["copy"]["trainable_params"]


def test_memory_tiny(tmp_path):
    """copy (the ratio's base), precomputed (a cold run, then the warm one), a precision
    variant; gpu_check's test covers adapter and reference_free."""
    strategies = "copy,precomputed,copy+bf16-true"
    ran, summary, stdout = run_script(
        tmp_path, "memory.py", "--model", "tiny", "--steps", "1", "--strategies", strategies
    )
    expected = ["copy", "precomputed (cold cache)", "precomputed", "copy+bf16-true"]
    if "precomputed" in ran:  # the cold run fills the cache, the warm one reads it
        assert not ran["precomputed (cold cache)"]["cache_hit"] and ran["precomputed"]["cache_hit"]
    else:
        expected.remove("precomputed (cold cache)")
    assert [r["strategy"] for r in summary["results"]] == expected
    assert "| copy | " in stdout and " | 1.00 | " in stdout  # copy's ratio to itself
    for name, r in ran.items():
        assert r["peak_rss_gib"] >= r["start_rss_gib"] > 0.05
        assert r["median_step_s"] > 0 and r["step_s"] == [r["median_step_s"]]
        if name != "copy+bf16-true":
            assert abs(r["loss"] - math.log(2)) < 1e-4


def test_main_job_times_configs_side_by_side(tmp_path, tiny_model_dir):
    """benchmarks/main_job.py fits each config in its own process and reports wall times as
    ratios of the first (here the tiny config twice, with and without packing)."""
    pairs = [{"prompt": f"Review film {i}:", "chosen": " a delight.", "rejected": " boring."}
             for i in range(12)]  # fmt: skip
    pairs_dir = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "main-job.json"
    config = str(BENCHMARKS.parent / "configs" / "tiny.yaml")
    extra = f"--model.model_name_or_path {tiny_model_dir} --data.dataset {pairs_dir}"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.main_job", "--configs", f"{config},{config}",
         "--args", extra, "--workdir", str(tmp_path / "runs"), "--out", str(out)],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, second = json.loads(out.read_text())["results"]
    assert first["returncode"] == second["returncode"] == 0
    assert first["wall_vs_first"] == 1 and second["wall_s"] > 0
    assert first["eval"] is None  # the tiny config has no held-out evaluation callback
    assert "last_validation" in first
    assert (tmp_path / "runs" / "run1" / "hf").is_dir()  # the second run's own datasets cache
    assert f"{config}: " in proc.stdout and ", x1.00" in proc.stdout
