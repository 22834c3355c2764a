"""Faults, for real: a kill -9 storm, a full disk, an unwritable run directory, a missing or
damaged corpus cache, and progress output that a SLURM log file can hold.

Each test drives `python -m lmu_asr.launch` (or the corpus builder) in subprocesses, like a
researcher would, and checks what they rely on: the newest complete checkpoint is where a run
resumes, nothing already written is lost, and each fault is one line naming the file and what
to do. The mounts (tmpfs, read-only) need root; each test unmounts what it mounted."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from lmu_asr.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from lmu_asr.corpus import CorpusError, build_corpus
from tests.test_train import SMALL, assert_bitwise_equal, tensors

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root"),
]

# a smaller corpus than test_train's (later overrides win): each build costs seconds here
CORPUS = dict(n_train=16, n_dev=4, n_test=4, seed=0)
TINY = ["data.corpus_train=16", "data.corpus_dev=4", "data.corpus_test=4", "tracking=off"]
TINY += ["trainer.final_lm=false", "checkpoint.every_minutes=0", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def corpus_build(tmp_path_factory) -> tuple[dict[str, str], Path]:
    """The corpus these tests train on, built by the command line with stderr to a file (as in
    a SLURM job): the environment that points at it, and that log."""
    cache, log = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("log") / "corpus.log"
    cmd = [sys.executable, "-m", "lmu_asr.corpus", "--cache-dir", str(cache)]
    cmd += [f"--{k.removeprefix('n_')}={v}" for k, v in CORPUS.items()]
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=f, check=True, timeout=300)
    return os.environ | {"LMU_ASR_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}, log


@pytest.fixture(scope="module")
def corpus_env(corpus_build) -> dict[str, str]:
    return corpus_build[0]


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "lmu_asr.launch", *SMALL, *TINY, f"hydra.run.dir={run_dir}",
            *overrides]  # fmt: skip


class Mount:
    """A tmpfs of `size` at a fresh folder under tmp_path; always unmounted by the finalizer."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", self.path], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", self.path], check=False)


@pytest.fixture
def mounts():
    made: list[Mount] = []
    yield lambda path, size: made.append(Mount(path, size)) or made[-1]
    for m in reversed(made):
        m.unmount()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- kill -9 storm ---------------------------------------------------------------------------

EVAL_EVERY, MAX_STEPS = 4, 32  # room: no life may reach the end before the last kill
STORM = [f"trainer.max_steps={MAX_STEPS}", f"trainer.eval_every={EVAL_EVERY}"]
STORM += ["checkpoint.every_steps=1"]  # a write at every step: kills land near writes
STORM += ["trainer.patience=0"]  # no early stop: with a dev metric that stalls the run ended at
# step 20 of 32, before the planned kills
KILLS = 22
# what each kill waits for: a checkpoint being written, a validation starting, a random delay
# from the start (mostly start-up: imports, resume), a random delay after the first step
PLAN = ["write"] * 4 + ["validation"] * 3 + ["training"] * 3 + ["start"] * 12


def newest_complete(run_dir: Path) -> int | None:
    """The newest checkpoint step with its marker, read here without lmu_asr's own listing."""
    folders = (run_dir / "checkpoints").glob("step-*")
    steps = [int(p.name[5:]) for p in folders if (p / "COMPLETE").exists()]
    return max(steps, default=None)


def resumed_step(log: str) -> int | None:
    """The step this life resumed from, from its log ("resumed from <path> (step N, ...)")."""
    found = re.findall(r"resumed from (\S+) \(step (\d+),", log)
    if not found:
        return None
    path, step = found[-1]
    assert Path(path).name == f"step-{int(step):08d}", log
    return int(step)


def leftovers(run_dir: Path) -> set[str]:
    """What killed checkpoint writers left: temp folders, step folders without the marker."""
    ckpts = run_dir / "checkpoints"
    names = [p.name for p in os.scandir(ckpts)] if ckpts.is_dir() else []
    return {n for n in names if n.startswith((".tmp-", ".old-"))} | {
        n for n in names if n.startswith("step-") and not (ckpts / n / "COMPLETE").exists()
    }


def wait_and_kill(proc, kind: str, rng: random.Random, run_dir: Path, out: Path, start: int,
                  startup_s: float):  # fmt: skip
    """SIGKILL `proc` at the moment `kind` asks for. Returns (seconds since the process began,
    seconds it took to reach its first step or None), or None if it ended first. Delays scale
    with the start-up time seen so far, so that a loaded machine gets the same kind of kills."""
    t0, first_step = time.monotonic(), None
    ckpts, before = run_dir / "checkpoints", leftovers(run_dir)
    deadline = t0 + rng.uniform(0.05, 0.95) * startup_s if kind == "start" else None
    if kind == "training":  # a moment in step `target` + 1 (its compute, log or checkpoint)
        target, after = start + rng.randint(1, 3), rng.uniform(0.0, 0.3)
    elif kind == "write":  # the write of a step 1-3 ahead: some progress in this life
        target = start + rng.randint(1, 3)
    elif kind == "validation":
        target = (start // EVAL_EVERY + 1) * EVAL_EVERY  # the next validation
    while proc.poll() is None:
        now = time.monotonic()
        if kind in ("training", "validation") or first_step is None:
            log = out.read_text()
            if first_step is None and "| loss" in log:
                first_step = now - t0
        if deadline is not None and now >= deadline:
            break
        if kind == "training" and deadline is None and f"] step {target}/" in log:
            deadline = now + after
        if kind == "write" and ckpts.is_dir():
            names = {p.name for p in os.scandir(ckpts)} - before  # this life's writes
            if any(n.startswith(".tmp-step-") and int(n[10:18]) >= target for n in names):
                break
            # the write came and went between two looks (a loaded machine): kill now, in
            # training, rather than let the life run to the end and stop the storm early
            if any(n.startswith("step-") and int(n[5:13]) >= target for n in names):
                break
        if kind == "validation" and f"] step {target}/" in log:
            break  # logged just before the validation of that step starts
        if kind in ("training", "validation") and deadline is None:
            steps = re.findall(r"\] step (\d+)/", log)  # the moment passed between two looks:
            if steps and int(steps[-1]) > target:  # kill now rather than let the life finish
                break
        time.sleep(0.001 if kind == "write" else 0.005)
    else:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return time.monotonic() - t0, first_step


def where_it_landed(run_dir: Path, log: str, before: set[str]) -> str:
    if leftovers(run_dir) - before:  # this life left a checkpoint half-written
        return "checkpoint write"
    steps = [int(s) for s in re.findall(r"\] step (\d+)/", log)]
    if steps and steps[-1] % EVAL_EVERY == 0 and f"dev @ step {steps[-1]}:" not in log:
        return "validation"
    if not steps:
        return "start-up"
    return "training"


def test_kill_9_storm_resumes_from_the_newest_complete_checkpoint_and_ends_bitwise_equal(
    tmp_path, corpus_env
):
    """SIGKILL a CPU run >= 20 times, at moments chosen from a seeded plan (inside checkpoint
    writes, during validation, at random delays), restarting the same command after each kill:
    every start resumes from the newest complete checkpoint there was, and the end is bitwise
    the model and optimizer of a run never interrupted. Replay a failure with the printed seed:
    LMU_ASR_STORM_SEED=<seed>."""
    seed = int(os.environ.get("LMU_ASR_STORM_SEED", random.randrange(2**32)))
    print(f"kill -9 storm seed: {seed} (replay: LMU_ASR_STORM_SEED={seed})")
    rng = random.Random(seed)
    plan = rng.sample(PLAN, len(PLAN))
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "storm"
    kw = {"env": corpus_env, "stderr": subprocess.STDOUT, "text": True}
    with open(tmp_path / "straight.log", "w") as f:  # the uninterrupted run, meanwhile
        straight = subprocess.Popen(command(straight_dir, *STORM), stdout=f, **kw)

    kills, startup_s = [], 3.0  # seconds to the first step, updated as lives reach it
    for life in range(len(plan) + 1):
        expected, before = newest_complete(run_dir), leftovers(run_dir)
        ckpts = run_dir / "checkpoints"
        found = sorted(p.name + "*" * (p / "COMPLETE").exists() for p in ckpts.glob("*"))
        listing = f"newest complete {expected} in {found} (* complete); kills so far {kills}"
        out = tmp_path / f"life-{life:02d}.log"
        with open(out, "w") as f:
            proc = subprocess.Popen(command(run_dir, *STORM), stdout=f, **kw)
        kind = plan[life] if life < len(plan) else "none"
        start = expected or 0
        if kind == "validation" and start >= MAX_STEPS - EVAL_EVERY:
            kind = "start"  # no validation left before the end: kill during start-up instead
        if kind in ("write", "training") and start >= MAX_STEPS - 3:
            kind = "start"
        killed = None
        if kind != "none":
            killed = wait_and_kill(proc, kind, rng, run_dir, out, start, startup_s)
        if killed is None:
            proc.wait(timeout=600)
        log = out.read_text()
        if killed is None or "resumed from" in log or re.search(r"\] start \d+ \(", log):
            # (a life killed before it chose a checkpoint has nothing to check)
            assert resumed_step(log) == expected, f"life {life}: {listing}\n{log}"
        if killed is None:
            assert proc.returncode == 0, log
            break
        delay, startup_s = killed[0], killed[1] or startup_s
        kills.append((kind, round(delay, 2), where_it_landed(run_dir, log, before), expected))

    print(f"{len(kills)} kills (kind, seconds after start, landed in, resumed from step):")
    print("\n".join(map(str, kills)))
    landed = [k[2] for k in kills]
    assert len(kills) >= 20, kills
    assert landed.count("checkpoint write") >= 2 and landed.count("validation") >= 2, kills
    straight.wait(timeout=600)
    assert straight.returncode == 0, (tmp_path / "straight.log").read_text()
    a, b = (list_checkpoints(r)[-1] for r in (straight_dir, run_dir))
    assert a.name == b.name  # MAX_STEPS, or where the straight run stopped early
    for item in ("model", "optimizer"):
        assert_bitwise_equal(tensors(a, item), tensors(b, item), item)
    sa, sb = tensors(a, "train_state"), tensors(b, "train_state")
    for key in ("step", "epoch", "batch_in_epoch", "best_metric", "best_step"):
        assert sa[key] == sb[key], key
    results = [json.loads((r / "results.json").read_text()) for r in (straight_dir, run_dir)]
    for key in ("status", "steps", "best_step", "dev_cer", "test_cer"):
        assert results[0][key] == results[1][key], key


# --- a full disk, an unwritable run directory ------------------------------------------------


def test_full_disk_during_a_checkpoint_write_stops_with_one_clear_line_then_resumes(
    tmp_path, corpus_env, mounts
):
    """The run directory's file system fills while checkpoint step 4 is written. The run stops
    (exit status 1) rather than training on: a run that cannot save loses all it trains at the
    next preemption or time limit, and on a shared cluster it would hold its GPU for nothing.
    The error says what is full and what to do, checkpoint step 2 still loads, the half-written
    one is gone (its space freed), and once there is space the same command resumes."""
    disk = mounts(tmp_path / "disk", "2600k")  # one checkpoint (~1.5 MB) fits, not two
    run_dir = disk.path / "run"
    cmd = command(run_dir, "trainer.max_steps=6", "checkpoint.every_steps=2")
    out = subprocess.run(cmd, env=corpus_env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("lmu_asr.checkpoint.")]
    root = run_dir / "checkpoints"
    assert f"CheckpointError: no space left on device (or quota exceeded) for {root}" in line
    assert (
        "while saving checkpoint step 4 (writing optimizer.pt: No space left on device); " in line
    )
    assert "free space there or set hydra.run.dir to a folder on a larger file system" in line
    assert line.endswith("run the same command again (it resumes from step-00000002, which is "
                         "intact)")  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert load_checkpoint(root / "step-00000002")["train_state"]["step"] == 2
    stop = json.loads((run_dir / "lifecycle.jsonl").read_text().splitlines()[-1])
    assert stop["reason"] == "failed" and "no space left on device" in stop["error"]

    disk.remount("size=64m")  # space freed
    out = subprocess.run(cmd, env=corpus_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"resumed from {root / 'step-00000002'} (step 2," in out.stdout
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 6


def test_unwritable_run_directory_is_one_line_and_loses_nothing(tmp_path, corpus_env, mounts):
    """A run directory on a file system that became read-only (root ignores chmod): the job
    ends before anything runs with one line naming the file and what to do; a checkpoint save
    that meets it says the same; every file there is as it was."""
    disk = mounts(tmp_path / "ro", "4m")
    run_dir = disk.path / "run"
    save_checkpoint(run_dir, 3, {"model": {"w": torch.ones(3)}}, keep_last=2)
    (run_dir / "train.log").write_text("[12:00:00] step 3/10 | loss 1.0\n")
    before = snapshot(run_dir)
    disk.remount("ro")

    out = subprocess.run(command(run_dir), env=corpus_env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 1
    assert (out.stdout + out.stderr).strip().splitlines() == [
        f"error: cannot write {run_dir}/train.log (Read-only file system): the run directory "
        f"{run_dir} is not writable; nothing in it was changed. Make it writable, or pass "
        "hydra.run.dir=<a writable folder> (a new run there starts from step 0)"
    ]
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(run_dir, 4, {"model": {"w": torch.zeros(3)}}, keep_last=1)
    assert str(err.value) == (
        f"cannot write to {run_dir / 'checkpoints'} while saving checkpoint step 4 (creating "
        "the temp folder: Read-only file system); make it writable or set hydra.run.dir to a "
        "writable folder, then run the same command again (it resumes from step-00000003, "
        "which is intact)"
    )
    assert snapshot(run_dir) == before


# --- the corpus cache ------------------------------------------------------------------------


def test_missing_or_unwritable_corpus_cache(tmp_path, mounts, capfd):
    """A cache folder that does not exist (deleted, or never made) is made and the corpus built
    there, saying where; one that cannot be written is one line naming it and what to do."""
    one = dict(n_train=1, n_dev=1, n_test=1, seed=5, engines=["espeak-ng"])
    missing = tmp_path / "deleted" / "cache"
    paths = build_corpus(**one, cache_dir=missing)
    assert capfd.readouterr().err.startswith(f"building the corpus once, in {missing}/corpus-")
    assert all(p.is_file() for p in paths.values())

    disk = mounts(tmp_path / "ro", "1m")
    disk.remount("ro")
    for cache in (disk.path, disk.path / "sub"):
        with pytest.raises(CorpusError) as err:
            build_corpus(**one, cache_dir=cache)
        assert str(err.value) == (
            f"corpus cache {cache} is not writable (Read-only file system): cannot build the "
            "corpus there; set LMU_ASR_CACHE (or data.cache_dir) to a writable folder"
        )


def test_truncated_wav_or_manifest_in_the_corpus_cache(tmp_path, corpus_env):
    """A wav or manifest of the cached corpus cut short (a full disk, a killed copy): one line
    naming it and what to do, instead of training on silently damaged data; nothing deleted."""
    cache = tmp_path / "cache"
    shutil.copytree(corpus_env["LMU_ASR_CACHE"], cache)
    (folder,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith("corpus-")]
    assert build_corpus(**CORPUS, cache_dir=cache)["train"] == folder / "train.jsonl"  # intact
    wav, manifest = sorted((folder / "wav" / "dev").iterdir())[1], folder / "test.jsonl"
    for damaged in (wav, manifest):
        size = damaged.stat().st_size
        os.truncate(damaged, size - 7)
        before = snapshot(cache)
        with pytest.raises(CorpusError) as err:
            build_corpus(**CORPUS, cache_dir=cache)
        assert str(err.value) == (
            f"corpus cache entry {damaged} is truncated or changed ({size - 7} bytes, {size} "
            f"expected); delete {folder} and run again to rebuild it (once no other job is "
            "using it)"
        )
        assert snapshot(cache) == before
        shutil.copy(Path(corpus_env["LMU_ASR_CACHE"]) / folder.name / damaged.relative_to(folder),
                    damaged)  # fmt: skip


# --- progress in logs --------------------------------------------------------------------------


def test_corpus_progress_in_a_log_file_is_a_few_plain_lines(corpus_build):
    """Built with stderr to a file (a SLURM job log): a plain line every 10 % (and the end),
    no carriage-return redraws piling up."""
    _, log = corpus_build
    text = log.read_bytes().decode()  # read_text() would turn each "\r" into a line break
    total = sum(CORPUS[k] for k in ("n_train", "n_dev", "n_test"))
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("building the corpus once, in ")
    assert 2 <= len(lines) - 1 <= 11, lines
    for line in lines[1:]:
        assert re.fullmatch(rf"building corpus: \d+/{total} utt \(\d+%\) in \S+, eta \S+", line)
    assert lines[-1].startswith(f"building corpus: {total}/{total} utt (100%) in ")


def test_corpus_progress_on_a_terminal_is_one_redrawn_line(tmp_path):
    """On a terminal the progress bar is one line, redrawn in place."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    cmd = [sys.executable, "-m", "lmu_asr.corpus", "--cache-dir", str(tmp_path)]
    cmd += ["--train=3", "--dev=1", "--test=1", "--engines=espeak-ng"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode().replace("\r\n", "\n")  # the terminal's newlines
    lines = [line for line in text.split("\n") if line.strip()]
    assert lines[0].startswith("building the corpus once, in ")
    (bar,) = lines[1:]
    assert bar.count("\r") >= 2 and bar.rstrip().endswith("utt/s]") and "5/5" in bar
