"""`python -m lmu_asr.status`: sweep and run directories built here with the files the trainer,
the launcher and SLURM's clients write (fake sacct/squeue on PATH), then one sweep on the real
local SLURM cluster, watched while it runs and after it ends, with no MLflow server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmu_asr import status
from tests.cluster import Cluster
from tests.test_ddp import free_port
from tests.test_slurm import LAUNCH, run
from tests.test_train import SMALL, corpus_env  # noqa: F401  (fixture)

STATUS = [sys.executable, "-m", "lmu_asr.status"]
TRACEBACK = """[12:00:01] job failed
Traceback (most recent call last):
  File "/x/lmu_asr/train.py", line 146, in train
    loss = step()
           ^^^^^^
{error}
"""
# what the fake clients answer: 1_4 and 1_7 are only in the queue; 1_8 never started
SACCT = """1_0|COMPLETED|0:0
1_1|RUNNING|0:0
1_2|FAILED|1:0
1_3|OUT_OF_MEMORY|0:125
1_5|FAILED|1:0
1_6|CANCELLED by 0|0:15
1_[8-9%2]|CANCELLED by 0|0:0
"""
SQUEUE = "1_4|PENDING\n1_7|PENDING\n"


def write_run(run_dir: Path, events=(), metrics=(), results=None, tracking=None, log="") -> None:
    """A run directory as the trainer leaves it: config, lifecycle, metrics, results, log."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("trainer:\n  max_steps: 100\n  metric: cer\n")
    (run_dir / "lifecycle.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / "train.log").write_text(log)
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    if tracking is not None:
        (run_dir / "tracking.json").write_text(json.dumps(tracking))


def start(step: int, restart: int = 0) -> dict:
    where = {"host": "n1", "slurm_job_id": "2", "restart": restart}
    return {"time": 1.0, "event": "start", "step": step} | where


def stop(reason: str, step: int | None, **extra) -> dict:
    return {"time": 2.0, "event": "stop", "reason": reason, "step": step} | extra


def train_rows(*steps: int) -> list[dict]:
    return [{"step": s, "time": time.time() - 30, "train/loss": 1.0} for s in steps]


def dev(step: int, wer: float, cer: float) -> dict:
    return {"step": step, "time": time.time() - 30, "dev/wer": wer, "dev/cer": cer}


def fake_slurm(folder: Path, sacct: str, squeue: str) -> Path:
    """sacct and squeue scripts that print canned answers and log their arguments."""
    folder.mkdir()
    for name, out in (("sacct", sacct), ("squeue", squeue)):
        script = folder / name
        script.write_text(f'#!/bin/sh\necho "$@" >> {folder}/calls\ncat <<"EOF"\n{out}EOF\n')
        script.chmod(0o755)
    return folder


@pytest.fixture
def sweep(tmp_path: Path, monkeypatch) -> Path:
    """A sweep of 9 jobs in every condition; SLURM's clients answer from SACCT and SQUEUE."""
    d = tmp_path / "sweep"
    jobs = [
        {"num": n, "slurm_job_id": f"1_{n}", "overrides": ["trainer.max_steps=40"]}
        for n in range(9)
    ]
    parent = {"uri": "http://mlflow:5000", "experiment_id": "3", "run_id": "p1"}
    parent["url"] = "http://mlflow:5000/#/experiments/3/runs/p1"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps({"jobs": jobs, "mlflow": parent}))
    url = "http://mlflow:5000/#/experiments/3/runs/r0"
    # tracking.json: the MLflow mirror's state, with the run once it exists
    mirror = {"offset": 0, "artifacts": [], "uri": "http://mlflow:5000", "experiment": "lmu_asr"}
    tracking = mirror | {"experiment_id": "3", "run_id": "r0", "url": url}
    # 0: finished; the best dev CER (the trainer's metric) is at step 50, the best WER at 100
    metrics = [*train_rows(25, 50), dev(50, 0.5, 0.2), *train_rows(75, 100), dev(100, 0.4, 0.25)]
    results = {"status": "finished", "steps": 100, "dev_wer": 0.5}
    write_run(d / "0", [start(0), stop("finished", 100)], metrics, results, tracking)
    # 1: running, no MLflow run yet; a half line at the end of metrics.jsonl
    metrics = [*train_rows(10, 20), dev(20, 0.9, 0.6), *train_rows(30)]
    write_run(d / "1", [start(0)], metrics, tracking=mirror)
    with open(d / "1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "ti')
    # 2: failed with an error in the lifecycle (the cause) and another one in the log
    error = "rank 1: ValueError: ctc infeasible: utterance impossible\n(90 frames)"
    log = TRACEBACK.format(error="RuntimeError: Connection closed by peer")
    write_run(d / "2", [start(0), stop("failed", None, error=error)], train_rows(5), log=log)
    # 3: lost: started, never stopped, and SLURM says the OOM killer ended it
    write_run(d / "3", [start(0)], train_rows(10, 20))
    # 4: requeued: a time limit, a lost start, then preempted: in the queue again
    events = [start(0), stop("time_limit", 40), start(40, 1)]
    events += [stop("lost", None, resumed_from=40), start(40, 2), stop("preemption", 70)]
    write_run(d / "4", events, train_rows(20, 40, 60, 70))
    # 5: failed before writing anything but its log (a traceback in submitit's stderr)
    write_run(d / "5", [start(0)], [])
    (d / ".submitit" / "1_5").mkdir(parents=True)
    torch_log = TRACEBACK.format(error="KeyError: 'model'").replace("\n", "\n[rank0]: ")
    (d / ".submitit" / "1_5" / "1_5_0_log.err").write_text("[rank0]: " + torch_log)
    # 6: cancelled by the user, who had it stop; 7: queued, no run directory yet; 8: cancelled
    # before it started
    write_run(d / "6", [start(0), stop("cancelled", 15)], train_rows(10))
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path / 'bin', SACCT, SQUEUE)}:/usr/bin:/bin")
    return d


def report(path: Path, capsys) -> dict:
    assert status.main([str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_job_of_a_sweep(sweep: Path, capsys):
    out = report(sweep, capsys)
    assert out["sweep"] and out["path"] == str(sweep)
    assert out["mlflow"]["url"].endswith("/runs/p1")
    jobs = {j["job"]: j for j in out["jobs"]}
    assert list(jobs) == [str(n) for n in range(9)]

    def pick(job: str, *keys: str) -> tuple:
        return tuple(jobs[job][k] for k in keys)

    keys = ("slurm_state", "run_state", "restarts", "step", "max_steps")
    assert pick("0", *keys) == ("COMPLETED", "finished", 0, 100, 100)
    assert pick("0", "best_step", "best_wer", "best_cer", "why") == (50, 0.5, 0.2, None)
    url = "http://mlflow:5000/#/experiments/3/runs/r0"
    assert jobs["0"]["mlflow"] == {
        "uri": "http://mlflow:5000", "experiment_id": "3", "run_id": "r0", "url": url
    }  # fmt: skip
    assert pick("1", *keys, "best_step", "mlflow", "why") == (
        "RUNNING", "running", 0, 30, 100, 20, None, None
    )  # fmt: skip
    assert jobs["1"]["last_update"] == pytest.approx(time.time() - 30, abs=10)
    assert pick("2", "slurm_state", "run_state", "exit_code") == ("FAILED", "failed", "1:0")
    assert (
        jobs["2"]["why"] == "rank 1: ValueError: ctc infeasible: utterance impossible (90 frames)"
    )
    assert pick("3", "slurm_state", "run_state", "step") == ("OUT_OF_MEMORY", "lost", 20)
    assert jobs["3"]["why"].startswith("OUT_OF_MEMORY (exit code 0:125): the job ended without")
    assert pick("4", *keys, "stops", "why") == (
        "PENDING", "stopped: preemption", 2, 70, 100, {"time_limit": 1, "lost": 1}, None
    )  # fmt: skip
    assert pick("5", "slurm_state", "run_state", "why") == ("FAILED", "lost", "KeyError: 'model'")
    assert pick("6", "slurm_state", "run_state", "why") == (
        "CANCELLED", "stopped: cancelled", "CANCELLED (exit code 0:15)"
    )  # fmt: skip
    assert pick("7", *keys, "step", "why") == ("PENDING", "-", 0, None, 40, None, None)
    assert pick("8", "slurm_state", "run_state", "why") == (
        "CANCELLED",
        "-",
        "CANCELLED (exit code 0:0)",
    )
    # one sacct call for all jobs (and the array, for the tasks never started), then squeue for
    # the two it does not know
    calls = (sweep.parent / "bin" / "calls").read_text().splitlines()
    assert len(calls) == 2 and calls[0].endswith(
        "-j " + ",".join(f"1_{n}" for n in range(9)) + ",1"
    )
    assert calls[1].endswith("-j 1_4,1_7")
    assert status._array_tasks("7_[2-4,6%2]") == ["7_2", "7_3", "7_4", "7_6"]


def test_table(sweep: Path, capsys):
    assert status.main([str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"sweep {sweep}: 9 jobs (2 CANCELLED, 1 COMPLETED, 2 FAILED, 1 OUT_OF_MEMORY, "
        "2 PENDING, 1 RUNNING)"
    )
    assert lines[1] == "MLflow sweep run: http://mlflow:5000/#/experiments/3/runs/p1"
    assert lines[2].split() == ["job", "slurm", "id", "state", "run", "restarts", "step"] + [
        "dev", "WER", "dev", "CER", "best@", "mlflow", "why"
    ]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[3:]}
    assert re.search(r"^0 +1_0 +COMPLETED +finished +0 +100/100 +50\.00% +20\.00% +50 +"
                     r"http://mlflow:5000/#/experiments/3/runs/r0$", rows["0"])  # fmt: skip
    assert re.search(r" RUNNING +running +0 +30/100 \(3\ds ago\) +90\.00% +60\.00% +20 +- *$",
                     rows["1"])  # fmt: skip
    why = "rank 1: ValueError: ctc infeasible: utterance impossible (90 frames)"
    assert re.search(r" FAILED +failed +0 +5/100 +- +- +- +- +" + re.escape(why) + "$", rows["2"])
    assert re.search(
        r" PENDING +stopped: preemption +2 \(1 time_limit, 1 lost\) +70/100 ", rows["4"]
    )
    assert re.search(r"^7 +1_7 +PENDING +- +0 +- +- +- +- +- *$", rows["7"])
    # the columns line up under the header's
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[2])][1:]
    for line in lines[3:]:
        assert all(line[c - 2 : c] == "  " and line[c] != " " for c in starts if c < len(line))


def test_one_run_dir_of_a_sweep_and_a_plain_sbatch_run(sweep: Path, tmp_path: Path, capsys):
    out = report(sweep / "5", capsys)  # the sweep's job id and submitit's logs are found
    assert not out["sweep"] and out["mlflow"] is None
    assert [(j["job"], j["slurm_job_id"], j["why"]) for j in out["jobs"]] == [
        ("5", "1_5", "KeyError: 'model'")
    ]
    run_dir = tmp_path / "sbatch-run"  # outside a sweep: the job id from lifecycle.jsonl
    write_run(run_dir, [start(0), stop("time_limit", 8)], train_rows(8))
    (tmp_path / "bin" / "sacct").write_text("#!/bin/sh\necho '2|PENDING|0:0'\n")
    job = report(run_dir, capsys)["jobs"][0]
    assert (job["job"], job["slurm_job_id"], job["slurm_state"]) == ("sbatch-run", "2", "PENDING")
    assert (job["run_state"], job["step"], job["max_steps"]) == ("stopped: time_limit", 8, 100)


def test_not_a_sweep_or_run_dir_is_a_one_line_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        out = subprocess.run([*STATUS, str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.startswith(f"status: error: {path} ") and out.stderr.count("\n") == 1


def test_without_slurm_the_table_comes_at_once(tmp_path: Path):
    run_dir = tmp_path / "run"
    write_run(run_dir, [start(0), stop("finished", 100)], [dev(100, 0.3, 0.1)], {"steps": 100})
    env = os.environ | {"PATH": str(tmp_path / "no-bin")}  # no sacct, no squeue
    t0 = time.monotonic()
    out = subprocess.run([*STATUS, str(run_dir)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 10
    assert re.search(
        r"^run +2 +unknown +finished +0 +100/100 +30\.00% +10\.00% +100 ", out.stdout, re.M
    )


def test_a_hanging_slurm_client_is_given_up(sweep: Path, capsys, monkeypatch):
    """Without slurm.conf, sacct and squeue retry for a minute: status waits SLURM_TIMEOUT_S."""
    monkeypatch.setattr(status, "SLURM_TIMEOUT_S", 1.0)
    for name in ("sacct", "squeue"):
        (sweep.parent / "bin" / name).write_text("#!/bin/sh\nexec sleep 30\n")
    t0 = time.monotonic()
    jobs = report(sweep, capsys)["jobs"]
    assert time.monotonic() - t0 < 3
    assert {j["slurm_state"] for j in jobs} == {"unknown"}
    assert [j["run_state"] for j in jobs][:3] == ["finished", "running", "failed"]
    # and so does the real client, if installed, with a slurm.conf that does not exist
    monkeypatch.setenv("PATH", os.environ["PATH"].split(":", 1)[1])
    monkeypatch.setenv("SLURM_CONF", str(sweep / "missing" / "slurm.conf"))
    t0 = time.monotonic()
    assert {j["slurm_state"] for j in report(sweep, capsys)["jobs"]} == {"unknown"}
    assert time.monotonic() - t0 < 3


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_on_the_cluster_while_running_and_after(
    slurm_cluster: Cluster,
    corpus_env,  # noqa: F811
    tmp_path: Path,
):
    """Two jobs with MLflow pointed at a port where no server runs."""
    env = slurm_cluster.env | corpus_env | {"LMU_ASR_PYTHON": sys.executable}
    # without these, `launch -m` retries the sweep's MLflow parent run for minutes
    env |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    sweep = tmp_path / "sweep"
    cmd = [*LAUNCH, "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", *SMALL]
    cmd += ["trainer.seed=0,1", "trainer.max_steps=60", "trainer.eval_every=30"]
    cmd += ["trainer.final_lm=false"]
    cmd += [f"tracking.uri=http://127.0.0.1:{free_port()}"]
    array = re.search(r"Submitted SLURM job array (\d+)", run(cmd, env, timeout=60).stdout)[1]

    def check() -> tuple[dict, str]:
        t0 = time.monotonic()
        js = subprocess.run(
            [*STATUS, str(sweep), "--json"], env=env, capture_output=True, text=True
        )
        table = subprocess.run([*STATUS, str(sweep)], env=env, capture_output=True, text=True)
        assert js.returncode == table.returncode == 0, js.stderr + table.stderr
        assert time.monotonic() - t0 < 10, "status took too long"
        return json.loads(js.stdout), table.stdout

    out, _ = check()
    assert [j["slurm_job_id"] for j in out["jobs"]] == [f"{array}_0", f"{array}_1"]
    assert {j["slurm_state"] for j in out["jobs"]} <= {"PENDING", "RUNNING"}, out
    deadline = time.monotonic() + 60
    while not any(j["run_state"] == "running" for j in out["jobs"]):  # the trainer has started
        assert time.monotonic() < deadline, out
        time.sleep(0.5)
        out, table = check()
    running = next(j for j in out["jobs"] if j["run_state"] == "running")
    assert running["slurm_state"] == "RUNNING" and running["max_steps"] == 60, out
    assert re.search(rf"^{running['job']} +{array}_\d +RUNNING +running ", table, re.M), table

    assert slurm_cluster.wait_job(array, timeout=120) == "COMPLETED COMPLETED"
    out, table = check()
    assert out["mlflow"] is None  # no server: no parent run
    for job in out["jobs"]:
        assert (job["slurm_state"], job["run_state"], job["restarts"]) == (
            "COMPLETED", "finished", 0
        ), out  # fmt: skip
        assert job["step"] == job["max_steps"] == 60 and job["best_step"] in (30, 60), out
        assert job["best_wer"] is not None and job["why"] is None and job["mlflow"] is None, out
    assert re.search(rf"^1 +{array}_1 +COMPLETED +finished +0 +60/60 +\d+\.\d\d% ", table, re.M)
    print(table)
