"""Preemption and requeue on the real local SLURM cluster: a job that SLURM times out, preempts or
requeues comes back by itself and ends exactly where an uninterrupted run ends (bitwise on CPU),
in the same run directory and MLflow run, with every step logged once and no step lost."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmu_asr.checkpoint import list_checkpoints, load_checkpoint
from tests.cluster import Cluster
from tests.test_ddp import free_port
from tests.test_slurm import LAUNCH, ROOT, losses, run
from tests.test_train import SMALL, assert_bitwise_equal, corpus_env  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Dropout and SpecAugment on; checkpoints only when stopping, so nothing but the stop path saves.
COMMON = [*SMALL, "trainer.log_every=1", "trainer.final_lm=false", "trainer.threads=1"]
COMMON += ["checkpoint.every_steps=1000000", "checkpoint.every_minutes=0", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def env(corpus_env) -> dict[str, str]:  # noqa: F811
    return corpus_env | {"LMU_ASR_PYTHON": sys.executable}


def reference(run_dir: Path, env: dict, overrides: list[str], ranks: int = 1) -> subprocess.Popen:
    """The uninterrupted run, started at once so that it runs beside the SLURM job; with 2 ranks
    through torchrun (an epoch whose batch count is odd is padded for 2 ranks, not for 1)."""
    launch = LAUNCH
    if ranks > 1:
        torchrun = Path(sys.executable).with_name("torchrun")
        launch = [str(torchrun), f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
        launch += ["-m", "lmu_asr.launch"]
    cmd = [*launch, *overrides, "tracking=off", f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True)
    with open(run_dir.with_suffix(".out"), "w") as out:  # a file: a full pipe would block it
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> None:
    proc.wait(timeout=600)
    assert proc.returncode == 0, (
        Path(proc.args[-1].split("=", 1)[1]).with_suffix(".out").read_text()[-3000:]
    )


def wait_until(predicate, what: str, timeout: float = 120, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "lifecycle.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict:
    ckpt = load_checkpoint(list_checkpoints(run_dir)[-1])
    return {"model": ckpt["model"], "optimizer": ckpt["optimizer"]}


def check_resumes(run_dir: Path, reason: str, at_least: int) -> list[dict]:
    """Every stop was for `reason` and lost no step: the next start is at the stop's step.
    Prints what a user would ask: work lost, and requeue -> first resumed step."""
    ev = events(run_dir)
    starts = [e for e in ev if e["event"] == "start"]
    stops = [e for e in ev if e["event"] == "stop" and e["reason"] not in ("finished",)]
    assert len(stops) >= at_least and len(starts) == len(stops) + 1, ev
    assert {s["reason"] for s in stops} == {reason}, ev
    assert len({s["slurm_job_id"] for s in starts}) == 1  # one job, requeued
    assert [s["restart"] for s in starts] == list(range(len(starts)))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for stop, start in zip(stops, starts[1:]):
        lost = stop["step"] - start["step"]
        first = next(r for r in rows if r["step"] == stop["step"] + 1)
        latency = first["time"] - stop["time"]
        print(f"{reason} at step {stop['step']}: {lost} steps lost, {latency:.1f} s from the stop "
              "to the first resumed step")  # fmt: skip
        assert lost == 0
    return stops


def job_logs(sweep: Path, lines: int = 30) -> str:
    """What a user would read after a failed job: its lifecycle and the end of each log."""
    out = []
    for path in sorted((sweep / "0").glob("lifecycle.jsonl")) + sorted(sweep.rglob("*_log.*")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(out) or f"no logs under {sweep}"


def assert_each_step_once(run_dir: Path, steps: int) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "train/loss" in r]
    assert logged == list(range(1, steps + 1))


@pytest.mark.timeout(1200)
def test_time_limit_requeues_the_job_until_it_ends_bitwise_like_an_uninterrupted_run(
    slurm_cluster: Cluster, env, tmp_path
):
    """timeout_min=1 with the warning 40 s before the limit: SLURM checks limits every 30 s, so
    the job is signalled 20-50 s after each start and requeues itself several times. A USR2
    before python has installed its handlers ends the task: under load the start (python, torch,
    Hydra) took over 10 s, which failed this test when the warning came 50 s before the limit."""
    steps = 1700  # about 5 one-minute slices on 2 cores: >= 2 requeues up to ~1.6x faster
    overrides = [*COMMON, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}"]
    ref = reference(tmp_path / "reference", env, overrides)
    sweep, db = tmp_path / "sweep", tmp_path / "mlflow.db"
    cmd = [*LAUNCH, "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", *overrides]
    cmd += ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=40"]
    cmd += ["trainer.max_restarts=40"]  # a slow machine needs more 1-minute slices
    cmd += [f"tracking.uri=sqlite:///{db}"]
    out = run(cmd, slurm_cluster.env | env, timeout=60)
    job_id = re.search(r"Submitted SLURM job array (\d+)", out.stdout)[1]
    state = slurm_cluster.wait_job(job_id, timeout=900)
    assert state == "COMPLETED", job_logs(sweep)
    finish(ref)

    job = sweep / "0"
    check_resumes(job, "time_limit", at_least=2)
    results = json.loads((job / "results.json").read_text())
    assert results["status"] == "finished" and results["steps"] == steps
    assert results["starts"] >= 3
    assert_bitwise_equal(final_state(job), final_state(tmp_path / "reference"))
    assert_each_step_once(job, steps)
    assert losses(job) == losses(tmp_path / "reference")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("lmu_asr").experiment_id])
    parent = json.loads((sweep / "sweep.json").read_text())["mlflow"]["run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 2 and len(children) == 1  # the sweep's parent run and the job's run
    assert children[0].info.status == "FINISHED"
    assert client.get_run(parent).info.status == "FINISHED"  # the parent followed its child
    history = client.get_metric_history(children[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert {m.step: m.value for m in history} == losses(job)


def test_partition_preemption_of_a_two_rank_job_mid_epoch(slurm_cluster: Cluster, env, tmp_path):
    """A 2-rank job in `low` fills the node; a `high` job preempts it: it saves, requeues, waits
    and resumes with the same per-rank data order and random draws. Short utterance batches make
    an epoch 10+ steps long; if the preemption happened to hit an epoch boundary, it is repeated."""
    steps = 150
    overrides = [*COMMON, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}"]
    overrides += ["trainer.batches_per_step=2", "data.max_duration=5", "data.max_frames=600"]
    ref = reference(tmp_path / "reference", env, overrides, ranks=2)
    sweep = tmp_path / "sweep"
    cmd = [*LAUNCH, "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", *overrides]
    cmd += ["hydra.launcher.partition=low", "hydra.launcher.tasks_per_node=2"]
    cmd += ["hydra.launcher.cpus_per_task=4"]  # the whole node: 8 CPUs
    out = run(cmd, slurm_cluster.env | env, timeout=60)
    job_id = re.search(r"Submitted SLURM job array (\d+)", out.stdout)[1]
    job = sweep / "0"

    def step() -> int:
        return max(losses(job), default=0) if (job / "metrics.jsonl").exists() else 0

    def stops() -> int:
        path = job / "lifecycle.jsonl"
        return sum(e["event"] == "stop" for e in events(job)) if path.exists() else 0

    mid_epoch = False
    while not mid_epoch:
        target, stopped = step() + 15, stops()
        wait_until(lambda t=target: step() >= t, f"job {job_id} training")
        slurm_cluster.run("sbatch", "-p", "high", "-c", "8", "--wrap", "sleep 1")
        wait_until(lambda n=stopped: stops() > n, f"job {job_id} preempted")
        at = events(job)[-1]["step"]
        mid_epoch = (
            load_checkpoint(job / "checkpoints" / f"step-{at:08d}")["train_state"]["batch_in_epoch"]
            != 0
        )
    assert slurm_cluster.wait_job(job_id, timeout=300) == "COMPLETED"
    finish(ref)

    check_resumes(job, "preemption", at_least=1)
    assert (job / "train-rank1.log").is_file()
    assert losses(job) == losses(tmp_path / "reference")
    assert_bitwise_equal(final_state(job), final_state(tmp_path / "reference"))
    assert_each_step_once(job, steps)


def test_scontrol_requeue_of_a_plain_sbatch_job(slurm_cluster: Cluster, env, tmp_path):
    """SIGTERM from `scontrol requeue`: the job saves within KillWait, SLURM requeues it, and it
    resumes in the same run directory."""
    steps = 400
    overrides = [*COMMON, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}"]
    ref = reference(tmp_path / "reference", env, overrides)
    run_dir = tmp_path / "run"
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={tmp_path}/slurm-%j.out"]
    cmd += ["slurm/train.sbatch", *overrides, "tracking=off", f"hydra.run.dir={run_dir}"]
    job_id = run(cmd, slurm_cluster.env | env).stdout.strip()
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 50,
               f"job {job_id} training")  # fmt: skip
    slurm_cluster.run("scontrol", "requeue", job_id)
    assert slurm_cluster.wait_job(job_id, timeout=300) == "COMPLETED"
    finish(ref)

    check_resumes(run_dir, "requeue", at_least=1)
    assert_bitwise_equal(final_state(run_dir), final_state(tmp_path / "reference"))
    assert_each_step_once(run_dir, steps)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "restart 1" in log and "Traceback" not in log


def test_kill_9_during_a_checkpoint_write_resumes_from_the_last_complete_one(
    slurm_cluster: Cluster, env, tmp_path
):
    """The training process is SIGKILLed while it writes a checkpoint (one is written after
    every step): train.sbatch requeues the job, which resumes from the newest complete
    checkpoint, never the partial one, and still ends bitwise like an uninterrupted run."""
    steps = 300
    overrides = [*COMMON, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}"]
    overrides += ["checkpoint.every_steps=1"]
    ref = reference(tmp_path / "reference", env, overrides)
    run_dir = tmp_path / "run"
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={tmp_path}/slurm-%j.out"]
    cmd += ["slurm/train.sbatch", *overrides, "tracking=off", f"hydra.run.dir={run_dir}"]
    job_id = run(cmd, slurm_cluster.env | env).stdout.strip()
    folder = run_dir / "checkpoints"

    def training_since(n_kills: int, step: int) -> bool:  # (re)started, and past `step`
        path = run_dir / "lifecycle.jsonl"
        started = path.exists() and len(events(run_dir)) == 2 * n_kills + 1
        return (
            started
            and (run_dir / "metrics.jsonl").exists()
            and max(losses(run_dir), default=0) > step
        )

    def writing() -> bool:
        return any(p.name.startswith(".tmp-") for p in folder.iterdir())

    kills = []  # (newest complete checkpoint, partial ones) right after each kill
    while not any(partial for _, partial in kills):  # a write can end between seen and killed
        assert len(kills) < 5, kills
        last = max(losses(run_dir)) if kills else 0
        wait_until(lambda s=last + 20: training_since(len(kills), s), f"job {job_id} training")
        trainer = [pid for pid, cmdline in slurm_cluster.job_processes().items()
                   if "lmu_asr.launch" in cmdline
                   and Path(cmdline.split()[0]).name.startswith("python")]  # fmt: skip
        assert len(trainer) == 1, slurm_cluster.job_processes()
        wait_until(writing, "a checkpoint write", timeout=60, poll=0)
        os.kill(trainer[0], signal.SIGKILL)
        wait_until(lambda pid=trainer[0]: not Path(f"/proc/{pid}").exists(), "the kill")
        partial = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
        kills.append((int(list_checkpoints(run_dir)[-1].name.removeprefix("step-")), partial))
    assert slurm_cluster.wait_job(job_id, timeout=300) == "COMPLETED"
    finish(ref)

    ev = events(run_dir)
    assert [e["event"] for e in ev] == ["start", "stop"] * (len(kills) + 1), ev
    for n, (newest_complete, partial) in enumerate(kills):
        lost, start = ev[2 * n + 1], ev[2 * n + 2]
        print(f"killed while writing {partial}; resumed from step {start['step']}")
        assert lost["reason"] == "lost" and start["restart"] == n + 1
        assert start["step"] == newest_complete
    assert_bitwise_equal(final_state(run_dir), final_state(tmp_path / "reference"))
    assert_each_step_once(run_dir, steps)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "was killed (SIGKILL); requeueing" in log
