"""Preemption and the files of a run, with real processes, real signals and real files.

SIGTERM mid-fit saves a checkpoint and exits 143 on every rank, and rerunning the same command
(`--ckpt_path last`) ends with the weights of a run never interrupted (one process, and DDP
with 2); runs started at once into one root never share a version directory; a checkpoint cut
short by a full disk leaves nothing under its name; negative and infinite numbers on the
command line end in one line naming the setting.
"""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl

ROOT = Path(__file__).parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
# preempt.py: `lit-dpo` with each rank's exit status on record; its SigtermAt sends the signal
PYTHONPATH = os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")]))
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": PYTHONPATH}
SIGTERM_AT = ["--trainer.callbacks+=preempt.SigtermAt", "--trainer.callbacks.step"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "6"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """16 pairs of different lengths: batches differ, so the data order shows in the weights."""
    rows = [
        {"prompt": f"Film {i}:", "chosen": " fine" + "!" * i, "rejected": " dull"}
        for i in range(16)
    ]
    return write_jsonl(tmp_path_factory.mktemp("preemption") / "pairs.jsonl", rows)


def fit_args(model_dir, data, root, *extra):
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--data.dataset", data]
    return [
        *args,
        "--model.model_name_or_path",
        model_dir,
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def lit_dpo(*args, exit_dir=None, **kwargs):
    """`lit-dpo ARGS` in a session of its own (a process group SIGTERM may be sent to)."""
    if exit_dir is not None:  # through preempt.py, which records each rank's exit status
        exit_dir.mkdir(parents=True, exist_ok=True)
        for old in exit_dir.iterdir():
            old.unlink()
        cmd = [sys.executable, str(SCRIPTS / "preempt.py"), *args]
        env = ENV | {"EXIT_DIR": str(exit_dir)}
    else:
        cmd, env = [sys.executable, "-m", "lit_dpo.cli", *args], ENV
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        start_new_session=True, **kwargs,
    )  # fmt: skip


def weights(root: Path, version: int) -> dict:
    return load_file(root / "lightning_logs" / f"version_{version}" / "hf" / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max |difference| {diff}"


@pytest.fixture(scope="module")
def preempted(tiny_model_dir, pairs_file, tmp_path_factory):
    """A 10-step run (2 pairs a step, 15 pairs: 8 steps an epoch) sent SIGTERM as its fourth
    step starts (global_step 3): (its root, its command, the result)."""
    root = tmp_path_factory.mktemp("preempted")
    args = fit_args(tiny_model_dir, pairs_file, root, "--trainer.max_steps", "10")
    args += ["--ckpt_path", "last", *SIGTERM_AT, "3"]  # SigtermAt fires only in a fresh run
    return root, args, lit_dpo(*args)


def test_sigterm_saves_exits_143_and_the_same_command_resumes(
    preempted, tiny_model_dir, pairs_file, tmp_path
):
    """The run ends when the step under way ends (mid-epoch, global_step 4) with a checkpoint
    and status 143; the same command resumes from it, crosses into a reshuffled second epoch
    and ends with the weights of a run never interrupted."""
    run, args, first = preempted
    assert first.returncode == 143, first.stderr[-3000:]  # not 0: the job did not finish
    saved = run / "lightning_logs/version_0/checkpoints/interrupted.ckpt"
    assert f"SIGTERM at step 4: saved {saved}" in first.stdout + first.stderr
    assert torch.load(saved, weights_only=True)["global_step"] == 4
    assert not (run / "lightning_logs/version_0/hf").exists()

    second = lit_dpo(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {saved}" in second.stdout + second.stderr
    whole = lit_dpo(*fit_args(tiny_model_dir, pairs_file, tmp_path, "--trainer.max_steps", "10"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert_same_weights(weights(tmp_path, 0), weights(run, 1))


@pytest.mark.parametrize("case", ["changed-setting", "cut-short"])
def test_resuming_refuses_a_changed_setting_or_a_cut_checkpoint(
    case, preempted, tiny_model_dir, pairs_file, tmp_path
):
    """`--ckpt_path <file>` keeps this command's settings (LightningCLI alone would silently
    take the checkpoint's): a changed beta is refused, naming it; so is a copy cut in half."""
    saved = preempted[0] / "lightning_logs/version_0/checkpoints/interrupted.ckpt"
    extra = ["--ckpt_path", str(saved), "--model.beta", "0.5"]
    line = f"checkpoint '{saved}' was trained with beta=0.1, this run has beta=0.5"
    if case == "cut-short":
        cut = tmp_path / "cut.ckpt"
        cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
        extra, line = ["--ckpt_path", str(cut)], f"--ckpt_path {cut}: not a whole checkpoint"
    run = lit_dpo(*fit_args(tiny_model_dir, pairs_file, tmp_path, *extra))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(f"lit-dpo: error: {line}")
    assert "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def ddp_whole(tiny_model_dir, pairs_file, tmp_path_factory):
    """The uninterrupted 2-process run the preempted ones must match."""
    root = tmp_path_factory.mktemp("ddp-whole")
    run = lit_dpo(*fit_args(tiny_model_dir, pairs_file, root, *DDP))
    assert run.returncode == 0, run.stderr[-3000:]
    return weights(root, 0)


def exit_statuses(exit_dir: Path, n: int = 2, wait: float = 60) -> dict[str, str]:
    """Each rank's exit status (rank 0 may end before the rank it started has written its own)."""
    deadline = time.monotonic() + wait
    while len(list(exit_dir.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return {p.name: p.read_text() for p in sorted(exit_dir.iterdir())}


@pytest.mark.parametrize("to", ["rank0", "group"])
def test_sigterm_ddp_all_ranks_stop_at_one_step_and_resume_exactly(
    to, ddp_whole, tiny_model_dir, pairs_file, tmp_path
):
    """2 processes (gloo, CPU), 15 pairs: 4 steps per epoch and rank. SIGTERM as the third
    step starts (global_step 2), sent to rank 0 alone (`kill PID`, `docker stop`: rank 0 passes
    it on to the rank it started) or to the whole process group (SLURM): both ranks stop when
    that step ends, one checkpoint (global_step 3), every rank exits 143; the same command then
    resumes into the second epoch."""
    args = fit_args(tiny_model_dir, pairs_file, tmp_path, *DDP, "--ckpt_path", "last", *SIGTERM_AT)
    args += ["2", "--trainer.callbacks.group", str(to == "group").lower()]
    first = lit_dpo(*args, exit_dir=tmp_path / "exit")
    assert first.returncode == 143, first.stderr[-3000:]
    assert exit_statuses(tmp_path / "exit") == {"rank0": "143", "rank1": "143"}
    (saved,) = (tmp_path / "lightning_logs").rglob("interrupted.ckpt")
    assert torch.load(saved, weights_only=True)["global_step"] == 3

    second = lit_dpo(*args, exit_dir=tmp_path / "exit")
    assert second.returncode == 0, second.stderr[-3000:]
    assert exit_statuses(tmp_path / "exit") == {"rank0": "0", "rank1": "0"}
    assert f"Restoring states from the checkpoint path at {saved}" in second.stdout + second.stderr
    assert_same_weights(ddp_whole, weights(tmp_path, 1))


def test_runs_started_together_never_share_a_version_directory(
    tiny_model_dir, pairs_file, tmp_path
):
    """Three runs into one root at the same moment, told apart by beta: each version directory
    holds one run's config, hyperparameters, checkpoint and export."""
    betas = [0.1, 0.2, 0.3]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lit_dpo.cli",
                *fit_args(tiny_model_dir, pairs_file, tmp_path),
                "--trainer.max_steps",
                "1",
                "--trainer.val_check_interval",
                "1",
                "--model.beta",
                str(beta),
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for beta in betas
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    versions = sorted((tmp_path / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0", "version_1", "version_2"]
    found = []
    for v in versions:
        beta = yaml.safe_load((v / "config.yaml").read_text())["model"]["beta"]
        assert yaml.safe_load((v / "hparams.yaml").read_text())["beta"] == beta
        (ckpt,) = (v / "checkpoints").glob("*.ckpt")
        assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["beta"] == beta
        assert (v / "hf" / "model.safetensors").exists()
        found.append(beta)
    assert sorted(found) == betas


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return subprocess.run(mount, capture_output=True).returncode == 0


def _file_size_limit(limit: int):
    def apply():  # in the child, before exec: a write past `limit` bytes fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("disk", ["tmpfs", "file-size-limit"])
def test_a_checkpoint_cut_short_leaves_nothing_under_its_name(
    disk, tiny_model_dir, pairs_file, tmp_path
):
    """The first checkpoint (epoch=0-step=2.ckpt, ~500 KB) does not fit: on a 256 KiB tmpfs
    (another filesystem than the temp dir, where Lightning's own save used to leave a partial
    file under the final name; needs root) or under a 200 KB file-size limit."""
    run = tmp_path / "run"
    limit = {}
    if disk == "tmpfs":
        if not _mount_tmpfs(run, "256k"):
            pytest.skip("mounting a tmpfs needs root")
    else:
        limit = {"preexec_fn": _file_size_limit(200_000)}
    try:
        result = lit_dpo(*fit_args(tiny_model_dir, pairs_file, run), **limit)
        files = [p.relative_to(run) for p in run.rglob("*")]
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(run)], check=True)
    target = run / "lightning_logs/version_0/checkpoints/epoch=0-step=2.ckpt"
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lit-dpo: error: could not write the checkpoint {target}: [Errno ")
    assert "Traceback" not in result.stderr
    assert not [f for f in files if f.suffix == ".ckpt" or f.name.endswith(".tmp")], files


@pytest.mark.parametrize(
    "override, line",
    [
        (["--model.beta", "-1e-3"], "--model.beta: Not of type PositiveFloat: -1e-3 does not"),
        (["--model.beta", "-inf"], "--model.beta: Not of type PositiveFloat: -inf does not"),
        (["--model.beta", "inf"], "beta must be a finite positive number, got inf"),
        (["--config", "beta-inf.yaml"], "beta must be a finite positive number, got inf"),
    ],
    ids=["negative-scientific", "minus-inf", "inf", "inf-in-yaml"],
)
def test_numbers_on_the_command_line_end_in_one_line(
    override, line, tiny_model_dir, pairs_file, tmp_path
):
    (tmp_path / "beta-inf.yaml").write_text("model:\n  beta: inf\n")
    override = [str(tmp_path / o) if o.endswith(".yaml") else o for o in override]
    run = lit_dpo(
        *fit_args(tiny_model_dir, pairs_file, tmp_path, "--trainer.max_steps", "1"), *override
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith(f"lit-dpo: error: {line}"), run.stderr[
        -3000:
    ]
    assert "Traceback" not in run.stderr and "usage:" not in run.stderr
