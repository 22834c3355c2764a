"""A real local SLURM cluster for tests: helpers and pytest fixtures around slurm/dev-cluster.sh.

`slurm_cluster` (one node, whole session) and `slurm_cluster_2nodes` (two nodes in their own network
namespaces, per module) start the cluster in a temporary directory and stop it at the end, failing
if any daemon or job process survives. Client commands go through `Cluster.run`, which points them
at the cluster with SLURM_CONF. Needs root and the Debian packages in PACKAGES (scripts/setup.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "dev-cluster.sh"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
# Variables of an enclosing SLURM job (tests run inside one on a real cluster) would leak into
# sbatch/srun calls against the test cluster.
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SACCT_", "SINFO_")


class CommandFailed(subprocess.CalledProcessError):
    """A client command exited non-zero; the message shows its output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]  # os.environ copy (without SLURM_* of an enclosing job) + SLURM_CONF
    nodes: int

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def run(
        self, *cmd: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (sbatch, squeue, sacct, scontrol, ...) against this cluster."""
        proc = subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, list(cmd), proc.stdout, proc.stderr)
        return proc

    def pids(self) -> list[int]:
        """Pids of every daemon the script started (DIR/run/<daemon>.pid)."""
        return sorted(
            int(text)
            for f in (self.dir / "run").glob("*.pid")
            if (text := f.read_text().strip()).isdigit()
        )

    def processes(self) -> dict[int, str]:
        """pid -> command line of every process of this cluster: all have SLURM_CONF=DIR/slurm.conf
        in their environment (the script exports it to its daemons, slurmd to slurmstepd and jobs).
        """
        return _processes_with_env(f"SLURM_CONF={self.conf}")

    def job_processes(self) -> dict[int, str]:
        """pid -> command line of the processes of this cluster's jobs: slurmstepd, and whatever
        has SLURM_JOB_ID too (job scripts, tasks, srun inside jobs)."""
        in_jobs = _processes_with_env(f"SLURM_CONF={self.conf}", "SLURM_JOB_ID=")
        return {
            pid: cmd
            for pid, cmd in self.processes().items()
            if pid in in_jobs or _read(f"/proc/{pid}/comm").strip() == "slurmstepd"
        }

    def wait_job(self, job_id: str, timeout: float) -> str:
        """Wait until the job (or every task of an array) is in a final state and sacct agrees.

        Returns the state, e.g. "COMPLETED"; for an array the states of its tasks in task order,
        joined by spaces ("COMPLETED FAILED"). Raises TimeoutError with the job's details.
        """
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            states = self._scontrol_states(job_id)
            if states and all(s in FINAL_STATES for s in states.values()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s: {states}")
            time.sleep(0.25)
        # sacct (what submitit polls) learns of the end a moment later, array tasks even later.
        while True:
            out = self.run(
                "sacct",
                "-X",
                "-n",
                "-P",
                "-o",
                "JobID,State",
                "-j",
                job_id,
                check=False,
                timeout=10,
            ).stdout
            seen = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
            if all(seen.get(key, "").split(" ")[0] == s for key, s in states.items()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id}: scontrol says {states} but sacct after {timeout} s:\n{out}"
                )
            time.sleep(0.25)
        return " ".join(states[key] for key in sorted(states, key=_task_order))

    def _scontrol_states(self, job_id: str) -> dict[str, str]:
        """{"J" or "J_T": state} of a job or of every task of an array, from `scontrol show job`."""
        proc = self.run("timeout", "5", "scontrol", "-o", "show", "job", job_id, check=False)
        states = {}
        for line in proc.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobState" not in fields:
                continue
            key = fields["JobId"]
            if fields.get("ArrayTaskId", "N/A") != "N/A":
                key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            states[key] = fields["JobState"]
        return states


def _task_order(key: str) -> tuple[int, int]:
    job, _, task = key.partition("_")
    return int(job), int(task) if task.isdigit() else -1


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """The process exists and is no zombie (this machine's init reaps orphans only now and then)."""
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _processes_with_env(*needles: str) -> dict[int, str]:
    """Running processes (but this one) whose environment has every needle: a whole `NAME=value`
    entry, or for needles ending in "=" any value of NAME."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(
            any(v.startswith(n) for v in env) if n.endswith("=") else n in env for n in needles
        ) and _running(int(entry.name)):
            cmdline = _read(f"/proc/{entry.name}/cmdline").replace("\0", " ").strip()
            found[int(entry.name)] = cmdline or _read(f"/proc/{entry.name}/comm").strip()
    return found


def missing_packages() -> list[str]:
    """The Debian packages of PACKAGES that are not installed."""
    if shutil.which("dpkg-query") is None:
        return list(PACKAGES)
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\\n", *PACKAGES],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if "install ok installed" in line}
    return [p for p in PACKAGES if p not in installed]


def require_slurm() -> None:
    """Fail (not skip: CI installs SLURM) when the cluster cannot be started here."""
    if missing := missing_packages():
        pytest.fail(
            f"SLURM test cluster: Debian packages missing: {' '.join(missing)}; "
            "run `bash scripts/setup.sh` (or apt-get install them)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail("SLURM test cluster: slurm/dev-cluster.sh must run as root", pytrace=False)


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start_cluster(dir: Path, nodes: int = 1) -> Cluster:
    """`dev-cluster.sh up DIR --nodes N`; the cluster is idle and sacct answers on return."""
    require_slurm()
    dir = Path(dir).resolve()
    try:
        proc = _script("up", str(dir), "--nodes", str(nodes), timeout=180)
    except subprocess.TimeoutExpired:
        _script("down", str(dir), timeout=120)
        raise
    lines = proc.stdout.strip().splitlines()
    expected = f"export SLURM_CONF={dir}/slurm.conf"
    if proc.returncode != 0 or not lines or lines[-1] != expected:
        _script("down", str(dir), timeout=120)
        pytest.fail(
            f"dev-cluster.sh up {dir} --nodes {nodes} failed (exit {proc.returncode})\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
            pytrace=False,
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLIENT_ENV_PREFIXES)}
    env["SLURM_CONF"] = str(dir / "slurm.conf")
    return Cluster(dir=dir, env=env, nodes=nodes)


def stop_cluster(cluster: Cluster) -> None:
    """`dev-cluster.sh down DIR`, then fail loudly if any daemon or job process survived."""
    before = {pid: "daemon" for pid in cluster.pids()} | cluster.processes()
    proc = _script("down", str(cluster.dir), timeout=180)
    assert proc.returncode == 0, f"dev-cluster.sh down failed:\n{proc.stdout}\n{proc.stderr}"
    deadline = time.monotonic() + 10
    while True:
        survivors = {pid: cmd for pid, cmd in before.items() if _running(pid)}
        survivors |= cluster.processes()
        if not survivors or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not survivors, (
        f"processes of the cluster in {cluster.dir} survived `down`: {survivors}\n{proc.stderr}"
    )
    prefix = _cluster_env(cluster.dir).get("NETNS_PREFIX")
    if prefix:
        left = sorted(p.name for p in Path("/run/netns").glob(f"{prefix}-*"))
        assert not left, f"network namespaces left behind by `down`: {left}"


def _cluster_env(dir: Path) -> dict[str, str]:
    """The names and ports `up` chose (DIR/cluster.env)."""
    text = _read(str(dir / "cluster.env"))
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in text.splitlines()) if k}


def _short_dir() -> Iterator[Path]:
    """A new folder with a short path, removed afterwards: slurmd's unix sockets live under the
    cluster's folder and must fit in 108 bytes, which pytest's tmp_path (longer still under
    pytest-xdist, and with long test names) does not promise."""
    d = Path(tempfile.mkdtemp(prefix="lmu-slurm-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


cluster_dir = pytest.fixture(_short_dir)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """A one-node cluster (8 CPUs, partitions debug/low/high) for the whole test session."""
    for d in _short_dir():
        cluster = start_cluster(d, nodes=1)
        yield cluster
        stop_cluster(cluster)


@pytest.fixture(scope="module")
def slurm_cluster_2nodes() -> Iterator[Cluster]:
    """A two-node cluster (n1, n2: own network namespaces, hostnames and IPs) for one module."""
    for d in _short_dir():
        cluster = start_cluster(d, nodes=2)
        yield cluster
        stop_cluster(cluster)
