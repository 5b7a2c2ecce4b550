"""Crash safety: SIGKILL a training run at random moments, some in the middle of a checkpoint write, and resume it
each time with `--resume`. After every kill the checkpoint left behind loads; at the end the weights and every
logged loss equal those of a run that was never interrupted, bit for bit."""

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vitkit.train.metrics import read_metrics
from vitkit.train.state import load_state

KILLS = 12
SETTINGS = {
    "model.img_size": 8,
    "model.overrides": "{patch_size: 2, in_chans: 1, width: 16, depth: 1, heads: 2, mlp_dim: 32}",
    "data.workers": 0,
    "train.batch_size": 16,
    "train.steps": 80,
    "train.save_every": 1,  # a checkpoint every step, so that many kills land in or next to a write
    "train.log_every": 1,
    "train.eval_every": 0,
    "augment.randaugment_ops": 1,
    "model.overrides.drop_path": 0.1,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(run: Path, resume: bool) -> subprocess.Popen:
    if resume:
        args = ["--resume"]
    else:
        args = [f"--set={k}={v}" for k, v in SETTINGS.items()]
    cmd = [sys.executable, "-m", "vitkit", "train", "--out", str(run), "--progress", "none", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def temporaries(run: Path) -> set[str]:
    """Temporary files of checkpoint writes (state.write_atomic) in the run's checkpoint folder."""
    try:
        return {p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name}
    except FileNotFoundError:
        return set()


def wait_for_the_run_directory(proc: subprocess.Popen, run: Path) -> None:
    """Until config.yaml exists, which is written just before the first step (or the process ends)."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and not (run / "config.yaml").exists() and time.monotonic() < deadline:
        time.sleep(0.001)


def kill_during_a_write(proc: subprocess.Popen, run: Path, stale: set[str]) -> None:
    """SIGKILL as soon as a new checkpoint write has its temporary file open (or the run ends)."""
    wait_for_the_run_directory(proc, run)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and not temporaries(run) - stale:
        time.sleep(0.0005)  # a write (with its fsync) lasts some milliseconds here
    proc.send_signal(signal.SIGKILL)


def kill_at_random(proc: subprocess.Popen, run: Path, rng: random.Random) -> None:
    """SIGKILL at a random moment: after 0 to 3 new checkpoints and a random few milliseconds, so before the
    first checkpoint, between two, or while the final model and plots are written."""
    wait_for_the_run_directory(proc, run)
    last, deadline = run / "checkpoints" / "last.pt", time.monotonic() + 600

    def version() -> tuple[int, int] | None:
        try:
            st = last.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns  # os.replace gives a new inode

    seen = version()
    for _ in range(rng.randint(0, 3)):
        while proc.poll() is None and version() == seen and time.monotonic() < deadline:
            time.sleep(0.0005)
        seen = version()
    time.sleep(rng.uniform(0, 0.02))
    proc.send_signal(signal.SIGKILL)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_sigkill_at_random_points_and_resume_gives_the_same_weights_bit_for_bit(tmp_path):
    reference = start(tmp_path / "reference", resume=False)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    run, rng = tmp_path / "run", random.Random(0)
    kills = in_writes = before_first_checkpoint = resumes = 0
    begun = time.perf_counter()
    while kills < KILLS:
        resume = (run / "config.yaml").exists()
        resumes += resume
        stale = temporaries(run)
        proc = start(run, resume)
        if kills == 0:  # the first kill lands before the first checkpoint: config.yaml and nothing else
            wait_for_the_run_directory(proc, run)
            proc.send_signal(signal.SIGKILL)
        elif kills % 2:
            kill_during_a_write(proc, run, stale)
        else:
            kill_at_random(proc, run, rng)
        returncode = proc.wait(timeout=60)
        if returncode == 0:  # it finished before the kill landed
            break
        assert returncode == -signal.SIGKILL, proc.stderr.read()
        kills += 1
        in_writes += bool(temporaries(run) - stale)  # a write cut short leaves its temporary file behind
        if (run / "checkpoints" / "last.pt").exists():
            state = load_state(run / "checkpoints" / "last.pt")  # whatever the moment, the checkpoint is whole
            assert 1 <= state["step"] <= 80 and state["model"]
        else:
            before_first_checkpoint += 1
    else:
        resumes += 1
        proc = start(run, resume=True)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    elapsed = time.perf_counter() - begun
    children = resource.getrusage(resource.RUSAGE_CHILDREN)

    print(
        f"\nkills: {kills} ({in_writes} during a checkpoint write, {before_first_checkpoint} before the first "
        f"checkpoint), resumes: {resumes}; {elapsed:.1f} s, {children.ru_utime + children.ru_stime:.1f} s CPU in "
        "the training processes (the uninterrupted one included)"
    )
    assert kills >= 10, "the run finished before ten kills; give it more steps"
    assert losses(run) == losses(tmp_path / "reference")  # every step once, with the same loss
    assert [s for s, _ in losses(run)] == list(range(1, 81))
    ours, theirs = final_weights(run), final_weights(tmp_path / "reference")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not temporaries(run)  # the resumed runs cleared what the kills left
    print("final weights bit-identical to the uninterrupted run: yes")
