"""The launch path on a real SLURM cluster (slurm/dev-cluster.sh, started by the fixtures): a sweep
as a job array that `launch -m` leaves queued; distributed training from srun (one node, two nodes
in network namespaces), from plain sbatch and from torchrun, each with the losses of one process;
a crashing rank; the doctor."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

from lmu_asr.checkpoint import list_checkpoints
from tests.cluster import Cluster, start_cluster, stop_cluster
from tests.test_ddp import free_port
from tests.test_train import SMALL, corpus_env  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, "-m", "lmu_asr.launch"]
# One global batch of 2 micro-batches per step, whatever the world size; dropout and SpecAugment
# on (their draws are keyed by step and global micro-batch, so the ranks' draws are one process's)
SAME = [*SMALL, "tracking=off", "trainer.max_steps=12", "trainer.eval_every=12"]
SAME += ["trainer.log_every=1", "trainer.batches_per_step=2", "trainer.final_lm=false"]
SAME += ["model.dropout=0.1", "features.freq_masks=1", "features.time_masks=1"]
SAME += ["optim.warmup_steps=2", "trainer.threads=1"]


def run(cmd: list[str], env: dict, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def assert_same_losses(reference: dict[int, float], other: dict[int, float], what: str) -> None:
    assert sorted(other) == sorted(reference) == list(range(1, 13)), what
    worst = max(abs(other[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert worst <= 1e-4, f"{what}: relative loss difference {worst:.2e} > 1e-4"


def job_log(job_dir: Path, pattern: str = "*") -> str:
    return "\n".join(p.read_text() for p in sorted(job_dir.glob(pattern)) if p.is_file())


@pytest.fixture(scope="module")
def env(corpus_env) -> dict[str, str]:  # noqa: F811
    return corpus_env | {"LMU_ASR_PYTHON": sys.executable}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, env) -> dict[int, float]:
    """The reference: one process, 2 micro-batches per step."""
    run_dir = tmp_path_factory.mktemp("one_process")
    run([*LAUNCH, *SAME, f"hydra.run.dir={run_dir}"], env)
    return losses(run_dir)


def test_sweep_returns_once_queued_then_every_job_completes(slurm_cluster: Cluster, env, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [*LAUNCH, "-m", "sweep=smoke", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}"]
    t0 = time.monotonic()
    out = run([*cmd, "tracking=off"], slurm_cluster.env | env, timeout=60)
    returned_after = time.monotonic() - t0
    array = re.search(r"Submitted SLURM job array (\d+) \(3 jobs\)", out.stdout)
    assert array, out.stdout + out.stderr
    # it returned while the jobs were still queued or running (it did not wait for them);
    # how fast it returns is measured by `python -m lmu_asr.bench orchestration`
    queued = slurm_cluster.run("squeue", "-h", "-r", "-j", array[1], "-o", "%i %T").stdout
    assert len(queued.splitlines()) >= 1, f"every job had ended when launch -m returned: {queued}"
    print(f"launch -m returned after {returned_after:.1f} s; still queued:\n{queued}")
    assert str(sweep) in out.stdout

    states = slurm_cluster.wait_job(array[1], timeout=300)
    assert set(states.split()) == {"COMPLETED"}, states
    record = json.loads((sweep / "sweep.json").read_text())
    assert [j["num"] for j in record["jobs"]] == [0, 1, 2]
    assert {j["slurm_job_id"] for j in record["jobs"]} == {f"{array[1]}_{i}" for i in range(3)}
    seeds = set()
    for num in range(3):
        job_dir = sweep / str(num)
        results = json.loads((job_dir / "results.json").read_text())
        assert results["status"] == "finished" and results["steps"] == 20
        assert (job_dir / ".hydra" / "config.yaml").is_file()
        assert "step 20/20" in (job_dir / "train.log").read_text()
        assert list_checkpoints(job_dir)
        overrides = (job_dir / ".hydra" / "overrides.yaml").read_text()
        seeds |= set(re.findall(r"trainer\.seed=(\d)", overrides))
    assert seeds == {"0", "1", "2"}


def test_two_tasks_on_one_node_train_like_one_process(
    slurm_cluster: Cluster, env, one_process, tmp_path
):
    """Through hydra/launcher=slurm with wait=true: blocks until the job has ended."""
    sweep = tmp_path / "sweep"
    cmd = [*LAUNCH, "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", *SAME]
    cmd += ["hydra.launcher.tasks_per_node=2", "hydra.launcher.wait=true"]
    run(cmd, slurm_cluster.env | env, timeout=300)
    job = sweep / "0"
    assert_same_losses(one_process, losses(job), "2 tasks on 1 node")
    # rank 0 alone writes the job's files; rank 1 logs to its own file
    assert (job / "train.log").is_file() and (job / "train-rank1.log").is_file()
    assert "step 12/12" in (job / "train.log").read_text()
    assert "step 12/12" not in (job / "train-rank1.log").read_text()
    assert (job / "results.json").is_file()


def test_two_nodes_with_plain_sbatch_train_like_one_process(
    slurm_cluster_2nodes: Cluster, env, one_process, tmp_path
):
    run_dir = tmp_path / "run"
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--chdir={ROOT}"]
    cmd += [f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch", *SAME]
    cmd += [f"hydra.run.dir={run_dir}"]
    job_id = run(cmd, slurm_cluster_2nodes.env | env).stdout.strip()
    state = slurm_cluster_2nodes.wait_job(job_id, timeout=300)
    log = job_log(tmp_path, "slurm-*.out")
    assert state == "COMPLETED", log
    assert_same_losses(one_process, losses(run_dir), "2 nodes, sbatch")
    assert re.search(r"on n\[1-2\]: 2 task\(s\)", log), log  # both nodes, one rank each
    assert (run_dir / "results.json").is_file()


def test_torchrun_two_processes_train_like_one_process(env, one_process, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}"]
    cmd += ["-m", "lmu_asr.launch", *SAME, f"hydra.run.dir={tmp_path}"]
    run(cmd, env, timeout=300)
    assert_same_losses(one_process, losses(tmp_path), "torchrun, 2 processes")
    assert (tmp_path / "results.json").is_file()


def test_a_crashing_rank_ends_the_job_nonzero_within_60_s(slurm_cluster: Cluster, env, tmp_path):
    """Two utterances, one per batch and rank; one cannot fit CTC, and data.strict=true makes
    the rank that loads it raise while the other waits in a collective."""
    wav = tmp_path / "a.wav"
    corpus = Path(env["LMU_ASR_CACHE"])
    shutil.copy(min(corpus.glob("corpus-*/wav/train/*.wav")), wav)
    seconds = soundfile.info(wav).duration
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "fine", "audio": "a.wav", "text": "a"}]
    rows += [{"id": "impossible", "audio": "a.wav", "text": "ab" * int(seconds * 100)}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    frames = int(seconds * 100) + 1
    sweep = tmp_path / "sweep"
    cmd = [*LAUNCH, "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2"]
    cmd += [f"hydra.sweep.dir={sweep}", "model=lmu_tiny", "data=manifest", "tracking=off"]
    cmd += [f"data.manifest={manifest}", f"data.dev_manifest={manifest}", "data.strict=true"]
    cmd += [f"data.max_duration={seconds * 1.1}", f"data.max_frames={frames * 3 // 2}"]
    cmd += ["data.num_workers=0"]
    cmd += ["features.normalize=utterance", "trainer.batches_per_step=2", "trainer.threads=1"]
    out = run(cmd, slurm_cluster.env | env, timeout=60)
    job_id = re.search(r"Submitted SLURM job array (\d+)", out.stdout)[1]

    assert slurm_cluster.wait_job(job_id, timeout=120) == "FAILED"
    time.sleep(6)  # longer than a requeued job waits (cred_expire=5) before it may run again
    show = slurm_cluster.run("scontrol", "-o", "show", "job", job_id).stdout
    assert "JobState=FAILED" in show and "Restarts=0" in show, show  # failed once, not requeued
    stops = [
        json.loads(line) for line in (sweep / "0" / "lifecycle.jsonl").read_text().splitlines()
    ]
    assert any(s.get("reason") == "failed" and "ctc infeasible" in s["error"] for s in stops), stops
    acct = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "ElapsedRaw,ExitCode")
    elapsed, exit_code = acct.stdout.split()[0].split("|")
    assert int(elapsed) < 60 and exit_code != "0:0", acct.stdout
    logs = job_log(sweep / ".submitit", "*/*_log.err")
    assert "utterance impossible" in logs and "ctc infeasible" in logs, logs
    assert "Traceback" in logs


def test_doctor_passes_against_the_cluster_and_fails_when_the_controller_stops(
    slurm_cluster: Cluster, env, cluster_dir
):
    doctor = [sys.executable, "-m", "lmu_asr.doctor", "tracking=off"]
    out = subprocess.run(doctor, env=slurm_cluster.env | env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^ok +slurm +controller up; partitions: debug .*low .*high", out.stdout, re.M)
    assert re.search(r"^ok +sacct", out.stdout, re.M)

    other = start_cluster(cluster_dir)
    try:
        ctld = [
            p for p in other.pids() if Path(f"/proc/{p}/comm").read_text().strip() == "slurmctld"
        ]
        assert len(ctld) == 1
        os.kill(ctld[0], signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{ctld[0]}").exists():
                break
            time.sleep(0.1)
        out = subprocess.run(doctor, env=other.env | env, capture_output=True, text=True)
    finally:
        stop_cluster(other)
    assert out.returncode == 1
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and "controller does not answer" in failed[0], out.stdout
