"""How is my sweep doing: `python -m lmu_asr.status [SWEEP_DIR | RUN_DIR] [--json]`.

One row per job: SLURM job id and state, restarts, last step, best dev WER/CER, MLflow run and,
for a job that failed, why. All but the SLURM state comes from the run directories (sweep.json,
lifecycle.jsonl, metrics.jsonl, results.json, tracking.json, logs), so it works while jobs run,
after they end, with the MLflow server down and without SLURM (state "unknown"). Exits 0
whatever the jobs did; 2 when the path is neither a sweep nor a run directory."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from lmu_asr.tracking import read_jsonl

SLURM_TIMEOUT_S = 5.0  # sacct and squeue together; without a config or controller they retry 60 s
FAILED = {"FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "CANCELLED", "TIMEOUT", "BOOT_FAIL",
          "DEADLINE", "PREEMPTED"}  # fmt: skip
ALIVE = {"unknown", "RUNNING", "SUSPENDED", "STOPPED", "SIGNALING"}  # a start may be in progress


@dataclass
class JobRow:
    job: str  # sweep job number, or the run directory's name
    run_dir: str
    slurm_job_id: str | None = None
    slurm_state: str = "unknown"  # sacct's, else squeue's, else unknown
    exit_code: str | None = None  # sacct's "exit:signal"
    run_state: str = "-"  # -, running, lost (gone without a stop), stopped: <why>, failed, finished
    restarts: int = 0
    stops: dict[str, int] = field(default_factory=dict)  # why the job stopped before restarts
    step: int | None = None
    max_steps: int | None = None
    last_update: float | None = None  # unix time of the last metrics line
    best_step: int | None = None  # the best dev evaluation by the trainer's metric
    best_wer: float | None = None
    best_cer: float | None = None
    mlflow: dict | None = None  # tracking.json: uri, experiment_id, run_id, url
    why: str | None = None  # one line, for a job that failed


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being written
        return None


def _trainer(config_yaml: Path) -> dict:
    """The `trainer` group of a Hydra config file; {} if there is none."""
    if not config_yaml.exists():
        return {}
    return (yaml.safe_load(config_yaml.read_text()) or {}).get("trainer") or {}


def _is_run_dir(path: Path) -> bool:
    return any((path / n).exists() for n in (".hydra", "lifecycle.jsonl", "metrics.jsonl"))


def find_jobs(path: Path) -> tuple[Path | None, dict, list[tuple[JobRow, list[str]]]]:
    """(sweep dir or None, sweep.json, [(row with job, run_dir, slurm_job_id; its overrides)]).
    ValueError naming the path when it is neither a sweep nor a run directory."""
    path = path.resolve()
    if (path / "sweep.json").exists() or (path / "multirun.yaml").exists():  # SLURM or local
        record = _read_json(path / "sweep.json") or {"jobs": []}
        by_num = {str(j["num"]): j for j in record["jobs"]}  # a relaunch in the dir: the last
        by_num |= {d.name: {} for d in path.iterdir()
                   if d.name.isdigit() and d.name not in by_num and _is_run_dir(d)}  # fmt: skip
        return path, record, [
            (JobRow(n, str(path / n), by_num[n].get("slurm_job_id")), by_num[n].get("overrides"))
            for n in sorted(by_num, key=int)
        ]  # fmt: skip
    if path.is_dir() and _is_run_dir(path):
        parent = _read_json(path.parent / "sweep.json") or {"jobs": []}
        entry = next((j for j in parent["jobs"] if str(j["num"]) == path.name), {})
        starts = [e for e in read_jsonl(path / "lifecycle.jsonl") if e.get("event") == "start"]
        job_id = entry.get("slurm_job_id") or (starts[-1].get("slurm_job_id") if starts else None)
        return (path.parent if entry else None), {}, [(JobRow(path.name, str(path), job_id), [])]
    raise ValueError(
        f"{path} does not exist"
        if not path.exists()
        else f"{path} is neither a sweep directory "
        "(with sweep.json or multirun.yaml) nor a run directory (.hydra/, metrics.jsonl, ...)"
    )


def slurm_states(job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """{job id: (state, exit code)} from sacct, then squeue for the ids sacct does not know
    (array tasks that have not started; sacct also lags a few seconds); ids neither knows are
    left out."""
    deadline = time.monotonic() + SLURM_TIMEOUT_S
    states: dict[str, tuple[str, str | None]] = {}
    arrays = {j.split("_")[0] for j in job_ids}  # for the tasks that never started
    sacct = ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j"]
    for line in _run([*sacct, ",".join([*job_ids, *sorted(arrays - set(job_ids))])], deadline):
        if len(f := line.split("|")) == 3 and f[1]:
            for job_id in _array_tasks(f[0]):
                states[job_id] = (f[1].split()[0], f[2])  # "CANCELLED by 0" -> CANCELLED
    if missing := [j for j in job_ids if j not in states]:
        for line in _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(missing)], deadline):
            if len(f := line.split("|")) == 2 and f[1]:
                states.setdefault(f[0], (f[1], None))
    return states


def _array_tasks(job_id: str) -> list[str]:
    """sacct's "7_[2-4,6%2]" (tasks that never started) -> ["7_2", "7_3", "7_4", "7_6"]."""
    array, _, spec = job_id.partition("_[")
    if not spec:
        return [job_id]
    tasks = []
    for part in spec.rstrip("]").split("%")[0].split(","):
        first, _, last = part.partition("-")
        tasks += [f"{array}_{t}" for t in range(int(first), int(last or first) + 1)]
    return tasks


def _run(cmd: list[str], deadline: float) -> list[str]:
    """Output lines of a SLURM client; [] if it is missing, fails or runs past the deadline."""
    try:
        timeout = max(deadline - time.monotonic(), 0.01)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return proc.stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return []


def fill(row: JobRow, overrides: list[str], sweep_dir: Path | None, slurm: dict) -> None:
    """Everything the run directory and SLURM say about the job."""
    run_dir = Path(row.run_dir)
    row.slurm_state, row.exit_code = slurm.get(row.slurm_job_id, ("unknown", None))
    events = read_jsonl(run_dir / "lifecycle.jsonl")
    starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
    this_start = starts[-1] if starts else 0
    row.restarts = max(len(starts) - 1, 0)
    row.stops = dict(Counter(e.get("reason") for e in events[:this_start] if "reason" in e))
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    results = _read_json(run_dir / "results.json") or {}
    steps = [r.get("step") for r in events + metrics] + [results.get("steps")]
    row.step = max((s for s in steps if isinstance(s, int)), default=None)
    row.last_update = max((m.get("time") or 0 for m in metrics), default=None)
    trainer = _trainer(run_dir / ".hydra" / "config.yaml")  # written when the job starts
    if not trainer and sweep_dir:  # not started: the sweep's config and the job's overrides
        trainer = _trainer(sweep_dir / "multirun.yaml")
        for key, _, value in (o.partition("=") for o in overrides or []):
            if key == "trainer.max_steps" and value.isdigit():
                trainer["max_steps"] = int(value)
    row.max_steps = trainer.get("max_steps") if isinstance(trainer.get("max_steps"), int) else None
    key = f"dev/{trainer.get('metric', 'cer')}"
    if devs := [m for m in metrics if isinstance(m.get(key), (int, float))]:
        best = min(devs, key=lambda m: m[key])  # the first of equals, as the trainer keeps it
        row.best_step, row.best_wer = best["step"], best.get("dev/wer")
        row.best_cer = best.get("dev/cer")
    tracking = _read_json(run_dir / "tracking.json") or {}  # there before the MLflow run is
    if tracking.get("run_id"):
        row.mlflow = {k: tracking.get(k) for k in ("uri", "experiment_id", "run_id", "url")}

    last = events[-1] if events else {}
    if last.get("event") == "start":  # and no stop yet
        row.run_state = "running" if row.slurm_state in ALIVE else "lost"
    elif results:
        row.run_state = str(results.get("status", "finished"))
    elif last:
        reason = last.get("reason")
        row.run_state = "failed" if reason == "failed" else f"stopped: {reason}"
    if row.slurm_state in FAILED or row.run_state in ("failed", "lost"):
        row.why = _why(row, events[this_start:], sweep_dir)


def _why(row: JobRow, since_start: list[dict], sweep_dir: Path | None) -> str:
    """The error the job recorded, else the last exception in its logs, else SLURM's state."""
    errors = [e["error"] for e in since_start if e.get("reason") == "failed" and e.get("error")]
    run_dir = Path(row.run_dir)
    logs = [run_dir / "train.log", *sorted(run_dir.glob("train-rank*.log"))]
    if sweep_dir and row.slurm_job_id:  # submitit's logs: stderr of every task
        logs += sorted((sweep_dir / ".submitit" / row.slurm_job_id).glob("*_log.err"))
    if found := errors[0] if errors else next(filter(None, map(_last_exception, logs)), None):
        return " ".join(found.split())
    why = row.slurm_state + (f" (exit code {row.exit_code})" if row.exit_code else "")
    if row.run_state == "lost":
        why += ": the job ended without stopping (node failure, out of memory or kill -9)"
    return why


def _last_exception(log: Path) -> str | None:
    """The exception line (`ValueError: ...`) of the last traceback in a log file."""
    if not log.is_file():
        return None
    text = re.sub(r"(?m)^\[rank\d+\]: ?", "", log.read_text(errors="replace"))  # torch's prefix
    tail = text.rpartition("Traceback (most recent call last):")[2] if "Traceback" in text else ""
    return next((s for s in tail.splitlines()[1:] if s.strip() and not s[0].isspace()), None)


def status(path: Path) -> dict:
    """{"path", "sweep": bool, "mlflow": the sweep's parent run or None, "jobs": [JobRow]}."""
    sweep_dir, record, jobs = find_jobs(path)
    ids = [row.slurm_job_id for row, _ in jobs if row.slurm_job_id]
    slurm = slurm_states(ids) if ids else {}
    for row, overrides in jobs:
        fill(row, overrides, sweep_dir, slurm)
    path = Path(path).resolve()
    return {"path": str(path), "sweep": path == sweep_dir, "mlflow": record.get("mlflow"),
            "jobs": [row for row, _ in jobs]}  # fmt: skip


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ago(t: float) -> str:
    s = max(time.time() - t, 0)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def table(report: dict) -> str:
    jobs: list[JobRow] = report["jobs"]
    lines = []
    if report["sweep"]:
        states = Counter(r.slurm_state for r in jobs)
        counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        lines.append(f"sweep {report['path']}: {len(jobs)} jobs ({counts or 'none submitted'})")
        if parent := report["mlflow"]:
            lines.append(f"MLflow sweep run: {parent.get('url') or parent.get('run_id')}")
    cells = [["job", "slurm id", "state", "run", "restarts", "step", "dev WER", "dev CER", "best@",
              "mlflow", "why"]]  # fmt: skip
    for r in jobs:
        reasons = ", ".join(f"{n} {why}" for why, n in r.stops.items())
        restarts = f"{r.restarts} ({reasons})" if reasons else str(r.restarts)
        step = "-" if r.step is None else f"{r.step}" + (f"/{r.max_steps}" if r.max_steps else "")
        if r.run_state == "running" and r.last_update:
            step += f" ({_ago(r.last_update)} ago)"  # a hung job stops updating
        mlflow = (r.mlflow.get("url") or r.mlflow.get("run_id") or "-") if r.mlflow else "-"
        cells.append([r.job, r.slurm_job_id or "-", r.slurm_state, r.run_state, restarts, step,
                      _pct(r.best_wer), _pct(r.best_cer), str(r.best_step or "-"), mlflow,
                      r.why or ""])  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmu_asr.status", description=__doc__)
    parser.add_argument("path", nargs="?", default=".", help="a sweep or a run directory")
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    args = parser.parse_args(argv)
    try:
        report = status(Path(args.path))
    except ValueError as err:
        print(f"status: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report | {"jobs": [asdict(r) for r in report["jobs"]]}, indent=2))
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
