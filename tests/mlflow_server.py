"""A real MLflow tracking server for tests, started through slurm/mlflow-server.sh.

    server = MlflowServer(tmp_path).start()    # sqlite store + artifacts under tmp_path
    ... tracking.uri=server.uri ...
    server.stop(); ...; server.start()          # an outage: same port, same store
    server.restart()

`mlflow_server` is a module-scoped fixture yielding a started server (import it into a test
module: `from tests.mlflow_server import mlflow_server  # noqa: F401`). With one worker and
MLflow's job runner off, start() took 7-10 s on this project's busy 2-core machine (up to 17 s
under heavier load) and stop() about 1.5 s (`start_seconds`, `stop_seconds` record each).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "mlflow-server.sh"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] not in "ZX":  # fields: state ppid pgrp ...
            pids.append(int(stat.parent.name))
    return pids


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its store in `root` (mlflow.db, artifacts/, server.log)."""

    def __init__(self, root: Path, port: int | None = None, workers: int = 1) -> None:
        self.root = Path(root)
        self.port = port or free_port()
        self.workers = workers
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.start_seconds: list[float] = []  # one per start(), for reports
        self.stop_seconds: list[float] = []

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with _NO_PROXY.open(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]

    def start(self, timeout: float = 120.0) -> MlflowServer:
        if self.proc is not None:
            raise RuntimeError(f"MLflow server on port {self.port} already started")
        if port_in_use(self.port):  # /health would be answered by whatever holds the port
            raise RuntimeError(f"port {self.port} is in use; cannot start MLflow there")
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [str(SCRIPT), "--dir", str(self.root), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(self.workers)]
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        t0 = time.monotonic()
        with open(self.log_path, "a") as log:  # appended: a restart keeps the earlier log
            log.write(f"==== start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n")
            log.flush()
            # its own session: stop() signals the whole tree (mlflow, uvicorn and its workers)
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        while not self.healthy():
            failed = self.proc.poll() is not None
            if failed or time.monotonic() - t0 > timeout:
                why = f"exited ({self.proc.returncode})" if failed else f"silent for {timeout} s"
                self.stop()
                raise RuntimeError(
                    f"MLflow server on {self.uri} {why}; its log ({self.log_path}):\n"
                    + self.log_tail()
                )
            time.sleep(0.2)
        self.start_seconds.append(time.monotonic() - t0)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the server's process group; SIGKILL what is left after `timeout`. Returns
        once no process of the group is alive and the port is free."""
        if self.proc is None:
            return
        t0, pgid = time.monotonic(), self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        while group_members(pgid) and time.monotonic() - t0 < timeout:
            time.sleep(0.1)  # uvicorn workers may outlive their parent briefly
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            while group_members(pgid):
                time.sleep(0.1)
        self.proc.wait()
        self.proc = None
        while port_in_use(self.port) and time.monotonic() - t0 < timeout + 10:
            time.sleep(0.1)
        self.stop_seconds.append(time.monotonic() - t0)

    def restart(self, timeout: float = 120.0) -> MlflowServer:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> MlflowServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *_: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
