"""Exports never delete what lit_dpo did not write, and never run a checkpoint's pickles.

Real files and checkpoints throughout: a `.ckpt` from a one-step fit, the sharded checkpoint
ModelParallelStrategy would write from it (torch.distributed.checkpoint + `meta.pt`), and
malicious variants whose pickles would `touch` a marker file if anything unpickled them.
"""

import functools
import os
import pickle
import shlex
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from test_module import trainer
from transformers import AutoModelForCausalLM

from lit_dpo.cli import main
from lit_dpo.data import PreferenceDataModule
from lit_dpo.export import MARKER
from lit_dpo.module import DPOModule

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


class Payload:
    """What a malicious checkpoint holds: unpickling it runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    """A `.ckpt` written by a one-step fit (in-memory rows: no dataset cache on disk)."""
    rows = {
        "prompt": [f"Review film {i}:" for i in range(4)],
        "chosen": [" a delight.", " wonderful.", " great music!", " loved it."],
        "rejected": [" boring.", " terrible.", " weak.", " I wanted to leave."],
    }
    split = datasets.Dataset.from_dict(rows)
    data = PreferenceDataModule(
        datasets.DatasetDict({"train": split, "validation": split}),
        tokenizer=tiny_model_dir,
        batch_size=2,
    )
    module = DPOModule(
        tiny_model_dir, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), lr_scheduler=None
    )
    t = trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    t.fit(module, data)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    t.save_checkpoint(path)
    return path


def shard(ckpt, out, payload=None):
    """The sharded checkpoint ModelParallelStrategy.save_checkpoint writes for `ckpt`: all the
    weights and the optimizer states through torch.distributed.checkpoint (tensors, plus
    pickled bytes for the optimizer's settings), the rest in `meta.pt`. `payload` joins the
    pickled bytes."""
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["state_dict"]  # lean: the sharded one keeps every key (the reference too)
    full = DPOModule.load_from_checkpoint(ckpt, weights_only=True).state_dict()
    state = {"state_dict": full}
    for i, optimizer in enumerate(checkpoint.pop("optimizer_states")):
        state[f"optimizer_{i}"] = optimizer
    if payload is not None:
        state["optimizer_0"]["param_groups"][0]["note"] = payload
    dcp.save(state, checkpoint_id=out, no_dist=True)
    torch.save(checkpoint, out / "meta.pt")
    return out


def export(*args):
    """`lit-dpo export ARGS`: None if it succeeds, else its one-line error."""
    try:
        main(["export", *map(str, args)])
    except SystemExit as exit_:
        assert "\n" not in str(exit_.code)
        return str(exit_.code)
    return None


def weights(directory):
    return load_file(directory / "model.safetensors")


# -- 1. nothing the package writes deletes a file it did not create ----------------------------


def test_a_directory_with_the_users_files_is_refused_untouched(ckpt, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    error = export("--ckpt_path", ckpt, "--output_dir", mine)
    assert error.startswith(f"lit-dpo: error: {mine} holds files lit_dpo did not write")
    assert "notes.txt" in error and "--output_dir" in error
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"

    monkeypatch.chdir(mine)  # `--output_dir .`, where the user works
    assert "lit_dpo did not write (notes.txt)" in export("--ckpt_path", ckpt, "--output_dir", ".")
    assert os.listdir(mine) == ["notes.txt"]


def test_an_empty_directory_takes_the_export_in_place(ckpt, tmp_path, monkeypatch):
    """The empty working directory itself (`--output_dir .`): it stays the same directory (same
    inode), so the shell sitting in it sees the export."""
    here = tmp_path / "here"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert export("--ckpt_path", ckpt, "--output_dir", ".") is None
    assert here.stat().st_ino == inode and (here / "model.safetensors").exists()
    assert not [p for p in os.listdir(here) if "tmp" in p]
    AutoModelForCausalLM.from_pretrained(here)


def test_a_previous_export_is_replaced_and_only_it(ckpt, tmp_path):
    out = tmp_path / "hf"
    assert export("--ckpt_path", ckpt, "--output_dir", out) is None  # new: appears whole
    first = weights(out)
    assert (out / MARKER).exists()
    (out / "config.json").write_text("{}")  # ours, spoilt: replaced by the next export
    assert export("--ckpt_path", ckpt, "--output_dir", out) is None
    AutoModelForCausalLM.from_pretrained(out)
    for name, value in weights(out).items():
        assert torch.equal(value, first[name]), name

    # A marker that lists a file outside the directory never reaches it.
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    marker = (out / MARKER).read_text().replace('"files": [', '"files": [\n  "../victim.txt",')
    (out / MARKER).write_text(marker)
    assert export("--ckpt_path", ckpt, "--output_dir", out) is None
    assert victim.read_text() == "keep me"

    (out / "README.md").write_text("my model card")  # the user's file in our export: refused
    before = sorted(os.listdir(out))
    error = export("--ckpt_path", ckpt, "--output_dir", out)
    assert "lit_dpo did not write (README.md)" in error
    assert sorted(os.listdir(out)) == before and (out / "README.md").read_text() == "my model card"


@pytest.mark.parametrize("where", ["default_root_dir", "user_dir"])
def test_fit_refuses_an_export_dirpath_before_training(where, tiny_model_dir, tmp_path):
    """`--export.dirpath` at the run's own directory (new and empty when fit starts, but the
    run writes into it), or at one holding a user's file: refused before the first step."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Review:", "chosen": " good.", "rejected": " bad."}\n' * 8)
    run = tmp_path / "run"
    target = run if where == "default_root_dir" else tmp_path / "mine"
    if where == "user_dir":
        target.mkdir()
        (target / "notes.txt").write_text("my notes")
    args = ["fit", "--config", str(TINY), "--model.model_name_or_path", tiny_model_dir]
    args += ["--data.dataset", str(pairs), "--trainer.default_root_dir", str(run)]
    args += ["--trainer.max_steps", "1", "--export.dirpath", str(target)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    error = str(exit_.value.code)
    assert "\n" not in error and str(target) in error and "--export.dirpath" in error
    if where == "default_root_dir":
        assert "is or holds the run's default_root_dir" in error
    else:
        assert "lit_dpo did not write (notes.txt)" in error
        assert (target / "notes.txt").read_text() == "my notes"
    assert not list(run.rglob("*.ckpt")) and not list(run.rglob("metrics.csv"))  # no step ran


# -- 2. no pickle from a checkpoint is unpickled unless the user opts in -----------------------


def test_a_sharded_checkpoint_exports_the_weights_of_its_ckpt(ckpt, tmp_path):
    sharded = shard(ckpt, tmp_path / "sharded")
    assert export("--ckpt_path", ckpt, "--output_dir", tmp_path / "a") is None
    assert export("--ckpt_path", sharded, "--output_dir", tmp_path / "b") is None
    assert export("--ckpt_path", sharded, "--output_dir", tmp_path / "c",
                  "--trust_checkpoint", "true") is None  # fmt: skip
    a, b, c = (weights(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name


def malicious(kind, ckpt, directory, marker):
    """A checkpoint that loads as usual, with a payload in the pickle each loader reads."""
    if kind == "ckpt":  # beside the weights in the .ckpt file itself
        path = directory / "evil.ckpt"
        torch.save({**torch.load(ckpt, weights_only=True), "note": Payload(marker)}, path)
        return path
    if kind == "sharded-bytes":  # in the optimizer's pickled settings (torch.load'ed in full)
        return shard(ckpt, directory / "evil", Payload(marker))
    path = shard(ckpt, directory / "evil")  # in the .metadata pickle (plain pickle.load)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    metadata.storage_meta.modules = [Payload(marker)]
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    return path


@pytest.mark.parametrize("kind", ["ckpt", "sharded-metadata", "sharded-bytes"])
def test_a_checkpoints_payload_never_runs_unless_trusted(kind, ckpt, tmp_path):
    marker = tmp_path / "pwned"
    evil = malicious(kind, ckpt, tmp_path, marker)
    error = export("--ckpt_path", evil, "--output_dir", tmp_path / "out")
    assert not marker.exists()
    if kind == "sharded-bytes":  # only tensors are read for an export: nothing to refuse
        assert error is None and (tmp_path / "out" / "model.safetensors").exists()
    else:
        assert "pickles posix.system" in error and "--trust_checkpoint true" in error
        assert str(evil) in error and not (tmp_path / "out").exists()

    # The payload is real: with the user's explicit trust, it runs.
    assert export("--ckpt_path", evil, "--output_dir", tmp_path / "trusted",
                  "--trust_checkpoint", "true") is None  # fmt: skip
    assert marker.exists()


def test_trust_remote_code_in_a_checkpoint_needs_the_users_trust(ckpt, tmp_path):
    """A checkpoint that says trust_remote_code would run its model's Python code on export."""
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["trust_remote_code"] = True
    torch.save(checkpoint, tmp_path / "remote.ckpt")
    error = export("--ckpt_path", tmp_path / "remote.ckpt", "--output_dir", tmp_path / "out")
    assert "sets trust_remote_code" in error and "--trust_checkpoint true" in error


# -- 3. what is not a checkpoint gets one line naming it -----------------------------------------


def test_what_is_not_a_checkpoint_is_named_in_one_line(ckpt, tmp_path):
    hf = tmp_path / "hf"
    assert export("--ckpt_path", ckpt, "--output_dir", hf) is None
    error = export("--ckpt_path", hf, "--output_dir", tmp_path / "out")
    assert f"{hf} is already a Hugging Face model directory" in error

    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    shutil.copy(hf / "model.safetensors", tmp_path / "model.safetensors")
    for path, says in [
        (tmp_path / "folder", "is a directory but not a sharded checkpoint"),
        (tmp_path / "notes.txt", "is not a checkpoint written by lit-dpo fit"),
        (tmp_path / "model.safetensors", "is not a checkpoint written by lit-dpo fit"),
        (tmp_path / "missing.ckpt", "no such file or directory"),
    ]:
        error = export("--ckpt_path", path, "--output_dir", tmp_path / "out")
        assert str(path) in error and says in error, error
    assert not (tmp_path / "out").exists()


# -- resuming: the same rule for `lit-dpo fit --ckpt_path <sharded dir>` -------------------------


@pytest.mark.parametrize("kind", ["sharded-metadata", "sharded-bytes"])
def test_resuming_from_a_sharded_checkpoint_never_runs_its_pickles(kind, ckpt, tmp_path):
    """torch.distributed.checkpoint would `pickle.load` the .metadata and `torch.load` the
    optimizer's settings with weights_only=False: checked first with an allow-list and
    weights_only, and refused in one line before anything loads."""
    from lit_dpo.checkpoints import check_sharded

    check_sharded(shard(ckpt, tmp_path / "good"))  # a real sharded checkpoint passes
    marker = tmp_path / "pwned"
    evil = malicious(kind, ckpt, tmp_path, marker)
    with pytest.raises(ValueError, match="pickles posix.system") as refused:
        check_sharded(evil)
    assert str(evil) in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()
