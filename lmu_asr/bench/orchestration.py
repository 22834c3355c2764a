"""The launch path on a SLURM cluster: time for `launch -m` to return on an 8-job sweep, sbatch
to the first training step, and requeue (`scontrol requeue`) to the first resumed step.

Uses the cluster that $SLURM_CONF points at, else starts a private one on this machine
(slurm/dev-cluster.sh: needs root and its Debian packages) and stops it afterwards. Jobs train
the tiny model on a tiny built-in corpus."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmu_asr.bench.measure import Measurement

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=lmu_tiny", "data.corpus_train=48", "data.corpus_dev=8", "data.corpus_test=8"]
TINY += ["data.num_workers=0", "data.max_frames=3000", "trainer.threads=1", "tracking=off"]
TINY += ["trainer.max_minutes=0", "trainer.final_lm=false", "trainer.log_every=1"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=8, help="jobs in the swept array")
    p.add_argument("--repeats", type=int, default=3)


def run(args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    from lmu_asr.corpus import build_corpus

    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        tmp = Path(tmp)
        build_corpus(48, 8, 8, seed=0, cache_dir=str(tmp / "cache"), progress=False)
        env = os.environ | {"LMU_ASR_CACHE": str(tmp / "cache"), "LMU_ASR_PYTHON": sys.executable}
        own = "SLURM_CONF" not in env
        if own:
            env["SLURM_CONF"] = _cluster("up", tmp / "cluster")
        try:
            return [
                _launch_returns(args, env, tmp),
                _sbatch_to_first_step(args, env, tmp),
                _requeue_to_resumed_step(args, env, tmp),
            ]
        finally:
            if own:
                _cluster("down", tmp / "cluster")


def _cluster(verb: str, folder: Path) -> str:
    out = _run(["bash", str(ROOT / "slurm" / "dev-cluster.sh"), verb, str(folder)], os.environ)
    return out.strip().splitlines()[-1].removeprefix("export SLURM_CONF=") if verb == "up" else ""


def _run(cmd: list[str], env: dict, timeout: float = 300) -> str:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out.stdout


def _launch_returns(args: argparse.Namespace, env: dict, tmp: Path) -> Measurement:
    seeds = ",".join(str(i) for i in range(args.jobs))
    secs = []
    for r in range(args.repeats):
        cmd = [sys.executable, "-m", "lmu_asr.launch", "-m", "sweep=smoke", "hydra/launcher=slurm"]
        cmd += [f"trainer.seed={seeds}", "tracking=off", f"hydra.sweep.dir={tmp}/sweep{r}"]
        t0 = time.perf_counter()
        out = _run(cmd, env)
        secs.append(time.perf_counter() - t0)
        found = re.search(rf"Submitted SLURM job array (\d+) \({args.jobs} jobs\)", out)
        if not found:
            raise RuntimeError(f"launch -m did not submit {args.jobs} jobs:\n{out}")
        _cancel(env, found.group(1))
    m = Measurement("launch_m_returns", "s", secs, {"jobs": args.jobs, "tracking": "off"})
    m.bar, m.met = "<= 5", m.median <= 5
    m.note = "from the command's start to its return, the array queued (Python start-up included)"
    return m


def _cancel(env: dict, job: str) -> None:
    """scancel, then wait until the job (or array) has left the queue: a cancelled job still
    saves a checkpoint into its run directory on the way out."""
    _run(["scancel", job], env)

    def queued() -> bool:  # squeue fails once SLURM has forgotten the job: gone too
        out = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True)
        return out.returncode == 0 and bool(out.stdout.strip())

    _wait(lambda: not queued(), f"job {job} to end", 120)


def _sbatch(env: dict, run_dir: Path, *overrides: str) -> str:
    cmd = ["sbatch", "--parsable", f"--output={run_dir}.out", "slurm/train.sbatch", *TINY]
    return _run([*cmd, *overrides, f"hydra.run.dir={run_dir}"], env).strip().split(";")[0]


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait(predicate: Callable[[], object], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _sbatch_to_first_step(args: argparse.Namespace, env: dict, tmp: Path) -> Measurement:
    secs = []
    for r in range(args.repeats):
        run_dir = tmp / f"first{r}"
        t0 = time.time()
        job = _sbatch(env, run_dir, "trainer.max_steps=1000", "trainer.eval_every=1000")
        _wait(lambda run_dir=run_dir: _rows(run_dir / "metrics.jsonl"), f"job {job}'s first step")
        secs.append(_rows(run_dir / "metrics.jsonl")[0]["time"] - t0)
        _cancel(env, job)
    m = Measurement("sbatch_to_first_step", "s", secs, {"model": "lmu_tiny", "ranks": 1})
    m.note = "sbatch to the first training step's metrics (scheduling, Python, data, model)"
    return m


def _requeue_to_resumed_step(args: argparse.Namespace, env: dict, tmp: Path) -> Measurement:
    run_dir = tmp / "requeue"
    metrics, lifecycle = run_dir / "metrics.jsonl", run_dir / "lifecycle.jsonl"
    job = _sbatch(env, run_dir, "trainer.max_steps=100000", "trainer.eval_every=100000",
                  "trainer.max_restarts=100")  # fmt: skip

    def stops() -> list[dict]:
        return [e for e in _rows(lifecycle) if e["event"] == "stop"]

    def step_after(stop: dict) -> list[dict]:
        return [row for row in _rows(metrics) if row["step"] == stop["step"] + 1]

    secs = []
    try:
        for r in range(args.repeats):
            done = len(_rows(metrics))
            _wait(lambda done=done: len(_rows(metrics)) >= done + 10, f"job {job} training")
            _run(["scontrol", "requeue", job], env)
            _wait(lambda r=r: len(stops()) > r, f"job {job} to stop")
            stop = stops()[r]
            _wait(lambda stop=stop: step_after(stop), f"job {job}'s first resumed step")
            secs.append(step_after(stop)[0]["time"] - stop["time"])
    finally:
        _cancel(env, job)
    m = Measurement("requeue_to_resumed_step", "s", secs, {"model": "lmu_tiny", "ranks": 1})
    m.bar, m.met = "<= 15", m.median <= 15
    m.note = "scontrol requeue: the job saves and stops, SLURM requeues it; stop -> next step"
    return m
