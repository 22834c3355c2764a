"""slurm/dev-cluster.sh: a real SLURM cluster (munge, MariaDB + slurmdbd, slurmctld, slurmd) here.

What users and the other tests rely on: `eval "$(dev-cluster.sh up DIR)"` works and is idempotent,
jobs run and sacct reports them, 8 one-CPU jobs run at once, `high` preempts and requeues `low`,
`down` leaves nothing behind, and a 2-node cluster has distinct hosts torch can rendezvous on.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.cluster import SCRIPT, Cluster, _running, start_cluster, stop_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def sbatch(cluster: Cluster, *args: str) -> str:
    return cluster.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]


def wait_for(what: str, predicate, timeout: float = 20, every: float = 0.2):
    """Poll predicate() until it returns something true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)
    return value


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def job_field(cluster: Cluster, job: str, name: str) -> str:
    out = cluster.run("scontrol", "-o", "show", "job", job).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields[name]


def test_up_prints_export_last_is_idempotent_and_status_follows(
    cluster_dir: Path, slurm_cluster: Cluster
):
    # A second cluster beside the session's one: free ports and own names make that possible.
    d = cluster_dir / "c"
    up = script("up", str(d))
    assert up.returncode == 0, up.stderr
    assert up.stdout.splitlines()[-1] == f"export SLURM_CONF={d}/slurm.conf", up.stdout
    cluster = Cluster(dir=d, env=dict(slurm_cluster.env, SLURM_CONF=f"{d}/slurm.conf"), nodes=1)
    try:
        # `eval "$(up)"` in a shell gives working clients (and returns: daemons hold no pipe).
        shell = subprocess.run(
            ["bash", "-c", f'eval "$(bash {SCRIPT} up {d})" && sinfo -h -o "%P %t"'],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "debug* idle" in shell.stdout, shell.stdout
        pids = cluster.pids()
        assert len(pids) == 5 and all(_running(p) for p in pids)  # munged mariadbd dbd ctld slurmd
        again = script("up", str(d))
        assert again.returncode == 0, again.stderr
        assert again.stdout.splitlines()[-1] == up.stdout.splitlines()[-1]
        assert cluster.pids() == pids, "a second `up` must not restart anything"

        status = script("status", str(d))
        assert status.returncode == 0, status.stdout + status.stderr
        for name in ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"):
            assert any(
                line.startswith(name) and line.endswith("running")
                for line in status.stdout.splitlines()
            ), status.stdout
        assert "idle" in status.stdout

        # Not the session cluster's ports or name.
        conf, other = (c.dir / "slurm.conf" for c in (cluster, slurm_cluster))
        keys = ("ClusterName", "SlurmctldPort", "SlurmdPort", "AccountingStoragePort")
        mine = {k: v for k, _, v in (x.partition("=") for x in conf.read_text().split())}
        theirs = {k: v for k, _, v in (x.partition("=") for x in other.read_text().split())}
        assert all(mine[k] != theirs[k] for k in keys), (mine, theirs)
    finally:
        stop_cluster(cluster)
    status = script("status", str(d))
    assert status.returncode != 0 and "stopped" in status.stdout, status.stdout
    assert script("down", str(d)).returncode == 0  # twice is fine
    # The session cluster was left alone.
    state = slurm_cluster.run("timeout", "5", "sinfo", "-h", "-o", "%t").stdout.strip()
    assert state in ("idle", "mix", "alloc"), state
    assert all(_running(p) for p in slurm_cluster.pids())


def test_down_kills_running_jobs_and_every_daemon(tmp_path: Path, cluster_dir: Path):
    cluster = start_cluster(cluster_dir / "c")
    try:
        # A batch job with a background sleep, and a step whose task sleeps.
        job = sbatch(
            cluster,
            f"--output={tmp_path}/job.out",
            "--wrap",
            f"sleep 300 & echo $! > {tmp_path}/sleep.pid; srun sleep 301; wait",
        )
        pid = int(wait_for("the job's sleep", lambda: read(tmp_path / "sleep.pid").strip()))
        wait_for(
            "the step", lambda: any("sleep 301" in c for c in cluster.job_processes().values())
        )
        jobs = cluster.job_processes()
        assert pid in jobs and _running(pid)
        daemons = cluster.pids()
        assert job_field(cluster, job, "JobState") == "RUNNING"
    finally:
        stop_cluster(cluster)  # asserts that no daemon or job process survives
    assert not [p for p in [pid, *jobs, *daemons] if _running(p)]


def test_sbatch_runs_and_sacct_reports_the_state(slurm_cluster: Cluster, tmp_path: Path):
    ok = sbatch(slurm_cluster, "--mem=4G", f"--output={tmp_path}/ok.out", "--wrap", "hostname")
    bad = sbatch(slurm_cluster, f"--output={tmp_path}/bad.out", "--wrap", "exit 3")
    assert slurm_cluster.wait_job(ok, timeout=30) == "COMPLETED"
    assert slurm_cluster.wait_job(bad, timeout=30) == "FAILED"
    assert read(tmp_path / "ok.out").strip(), "the job wrote no hostname"
    # (sacct fills some fields, e.g. Partition, only seconds later: check what submitit reads.)
    out = slurm_cluster.run(
        "sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", f"{ok},{bad}"
    ).stdout
    assert sorted(out.splitlines()) == sorted([f"{ok}|COMPLETED|0:0", f"{bad}|FAILED|3:0"]), out
    # An array: wait_job reports every task.
    arr = sbatch(slurm_cluster, "--array=0-2", "--output=/dev/null", "--wrap", "exit $((1 - 1))")
    assert slurm_cluster.wait_job(arr, timeout=30) == "COMPLETED COMPLETED COMPLETED"


def test_eight_one_cpu_jobs_run_at_once(slurm_cluster: Cluster):
    jobs = [
        sbatch(slurm_cluster, "-c1", "--output=/dev/null", "--wrap", "sleep 60") for _ in range(8)
    ]
    try:

        def running() -> bool:
            out = slurm_cluster.run("squeue", "-h", "-t", "R", "-o", "%i").stdout.split()
            return set(jobs) <= set(out)

        wait_for("8 one-CPU jobs RUNNING together", running, timeout=20)
    finally:
        slurm_cluster.run("scancel", *jobs)
    for job in jobs:
        assert slurm_cluster.wait_job(job, timeout=30) == "CANCELLED"


def test_partitions_and_preemption_requeue(slurm_cluster: Cluster, tmp_path: Path):
    parts = {}
    for line in slurm_cluster.run("scontrol", "-o", "show", "partition").stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        parts[fields["PartitionName"]] = fields
    assert set(parts) == {"debug", "low", "high"}
    assert parts["debug"]["Default"] == "YES"
    assert (parts["low"]["PriorityTier"], parts["low"]["PreemptMode"]) == ("1", "REQUEUE")
    assert parts["low"]["GraceTime"] == "10"
    assert (parts["high"]["PriorityTier"], parts["high"]["PreemptMode"]) == ("10", "OFF")
    assert all(p["MaxTime"] == "UNLIMITED" for p in parts.values())
    config = slurm_cluster.run("scontrol", "show", "config").stdout
    assert "preempt/partition_prio" in config and "preempt_send_user_signal" in config

    # A low job on all 8 CPUs whose task records the --signal signal; a high job needing them.
    out = tmp_path / "low.out"
    low_script = tmp_path / "low.sh"
    low_script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --partition=low --cpus-per-task=8 --signal=USR2 --output={out} --open-mode=append
        echo "start $SLURM_JOB_ID restart=${{SLURM_RESTART_COUNT:-0}}"
        [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ] && exit 0
        srun bash -c 'trap "echo task got USR2" USR2; echo ready; while :; do sleep 0.1; done'
        """)
    )
    low = sbatch(slurm_cluster, str(low_script))
    high = None
    try:
        wait_for("the low job's task", lambda: "ready" in read(out))
        high = sbatch(slurm_cluster, "-p", "high", "-c8", "--output=/dev/null", "--wrap", "sleep 1")
        wait_for("the user signal", lambda: "task got USR2" in read(out), timeout=10)
        # Killed at the end of GraceTime (10 s; slurmctld checks every few seconds), requeued.
        wait_for(
            "the requeue",
            lambda: job_field(slurm_cluster, low, "Restarts") == "1",
            timeout=40,
        )
        assert slurm_cluster.wait_job(high, timeout=30) == "COMPLETED"
        # A requeued job waits cred_expire (5 s) before it may start again; no need to wait here.
        slurm_cluster.run("scontrol", "update", f"JobId={low}", "StartTime=now")
        assert slurm_cluster.wait_job(low, timeout=30) == "COMPLETED"
    finally:
        slurm_cluster.run("scancel", low, *([high] if high else []), check=False)
    starts = [line for line in read(out).splitlines() if line.startswith("start")]
    assert starts == [f"start {low} restart=0", f"start {low} restart=1"], read(out)


def test_two_nodes_have_distinct_hostnames_that_resolve(slurm_cluster_2nodes: Cluster):
    out = slurm_cluster_2nodes.run(
        "srun",
        "-N2",
        "-n2",
        "-l",
        "bash",
        "-c",
        'echo "$(hostname) $(hostname -I) $(getent hosts n1 n2 | tr -s " \\n" " ")"',
        timeout=60,
    ).stdout
    rows = sorted(line.split(": ", 1)[1].split() for line in out.strip().splitlines())
    assert len(rows) == 2, out
    (h1, ip1, *r1), (h2, ip2, *r2) = rows
    assert (h1, h2) == ("n1", "n2") and ip1 != ip2, out
    assert r1 == r2 == [ip1, "n1", ip2, "n2"], out  # each node resolves both names


def test_gloo_all_reduce_across_two_nodes(slurm_cluster_2nodes: Cluster, tmp_path: Path):
    code = textwrap.dedent("""\
        import os, socket, torch, torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER']}:29517",
                                rank=int(os.environ["SLURM_PROCID"]),
                                world_size=int(os.environ["SLURM_NTASKS"]))
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        print("result", socket.gethostname(), dist.get_rank(), int(t.item()), flush=True)
        dist.destroy_process_group()
        """)
    (tmp_path / "ddp.py").write_text(code)
    out = tmp_path / "ddp.out"
    job = sbatch(
        slurm_cluster_2nodes,
        "-N2",
        "-n2",
        f"--output={out}",
        "--wrap",
        # the rendezvous is at the first node, by the name SLURM gives it
        "export MASTER=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1); "
        f"srun {sys.executable} {tmp_path}/ddp.py",
    )
    assert slurm_cluster_2nodes.wait_job(job, timeout=90) == "COMPLETED", read(out)
    results = sorted(
        line.split()[1:] for line in read(out).splitlines() if line.startswith("result")
    )
    assert results == [["n1", "0", "3"], ["n2", "1", "3"]], read(out)


def test_cluster_pids_are_the_daemons(slurm_cluster: Cluster):
    comms = sorted(Path(f"/proc/{p}/comm").read_text().strip() for p in slurm_cluster.pids())
    assert comms == ["mariadbd", "munged", "slurmctld", "slurmd", "slurmdbd"]
