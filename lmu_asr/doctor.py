"""Checks before a sweep: `python -m lmu_asr.doctor [--no-slurm] [launch overrides...]`.

One line per check (ok / warn / FAIL, and the fix); exits 1 if any check fails. The overrides are
those of `launch`, so the checks see the data, tracking URI and cache of the run you are about to
start."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from lmu_asr.config import Config
from lmu_asr.corpus import corpus_dir, default_cache_dir
from lmu_asr.tracking import resolve_uri

Check = tuple[str, str, str]  # (ok | warn | FAIL, what, detail and fix)
SLURM_COMMANDS = ("sbatch", "squeue", "sinfo", "sacct", "scontrol")


def check_torch() -> Iterator[Check]:
    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        yield "ok", "cuda", f"{torch.cuda.device_count()} GPU(s): {', '.join(sorted(names))}"
        if dist.is_nccl_available():
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
            yield "ok", "nccl", f"NCCL {nccl}"
        else:
            yield "FAIL", "nccl", "torch has no NCCL: install a CUDA build of torch"
    else:
        yield "warn", "cuda", f"torch {torch.__version__} sees no GPU: training runs on the CPU"
    if not dist.is_gloo_available():
        yield "FAIL", "gloo", "torch has no gloo backend: reinstall torch"


def _run(*cmd: str) -> subprocess.CompletedProcess:
    # sinfo/scontrol block when the controller is down: never wait more than a few seconds
    return subprocess.run(["timeout", "10", *cmd], capture_output=True, text=True)


def check_slurm() -> Iterator[Check]:
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        yield (
            "FAIL",
            "slurm",
            f"{', '.join(missing)} not found: install slurm-client (or --no-slurm)",
        )
        return
    ping = _run("scontrol", "ping")
    if ping.returncode != 0 or "UP" not in ping.stdout:
        conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
        why = (ping.stdout + ping.stderr).strip().splitlines() or ["no answer within 10 s"]
        yield "FAIL", "slurm", f"the controller does not answer ({why[-1]}; SLURM_CONF={conf})"
        return
    info = _run("sinfo", "--noheader", "--format=%P %a %D %t")
    parts: dict[str, list[int]] = {}
    for line in info.stdout.splitlines():  # "debug* up 2 idle": one line per partition and state
        name, avail, count, state = line.split()
        total_idle = parts.setdefault(name, [0, 0])
        total_idle[0] += int(count)
        total_idle[1] += int(count) if state == "idle" and avail == "up" else 0
    summary = ", ".join(
        f"{p.rstrip('*')} ({'default, ' if p.endswith('*') else ''}{idle}/{n} nodes idle)"
        for p, (n, idle) in parts.items()
    )
    yield "ok", "slurm", f"controller up; partitions: {summary or 'none'}"
    acct = _run("sacct", "--noheader", "--allocations", "--starttime=now", "--format=JobID")
    if acct.returncode != 0:
        why = (acct.stderr.strip().splitlines() or ["no answer"])[-1]
        yield "FAIL", "sacct", f"accounting does not answer ({why}): submitit needs sacct"
    else:
        yield "ok", "sacct", "accounting answers (submitit follows jobs through it)"


def check_tracking(cfg: Config) -> Iterator[Check]:
    if not cfg.tracking.enabled:
        yield "ok", "tracking", "MLflow off (tracking=off): metrics.jsonl only"
        return
    uri = resolve_uri(cfg.tracking.uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
            yield "ok", "tracking", f"{uri} answers"
        except OSError as err:
            yield "FAIL", "tracking", f"{uri} does not answer ({err}): start the server"
    elif uri.startswith("sqlite:///"):
        yield _writable("tracking", Path(uri.removeprefix("sqlite:///")).parent)
    else:
        yield "warn", "tracking", f"{uri}: not checked"


def _writable(what: str, folder: Path) -> Check:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return "FAIL", what, f"{folder} is not writable ({err})"
    free = shutil.disk_usage(folder).free / 2**30
    if free < 1:
        return "warn", what, f"{folder}: only {free:.2f} GiB free"
    return "ok", what, f"{folder} writable, {free:.0f} GiB free"


def check_paths(cfg: Config) -> Iterator[Check]:
    yield _writable("outputs", Path.cwd())  # runs/ and multirun/ are relative to it
    if cfg.data.source == "demo":
        yield _writable("cache", Path(cfg.data.cache_dir or default_cache_dir()))


def check_data(cfg: Config) -> Iterator[Check]:
    d = cfg.data
    if d.source == "demo":
        folder, _ = corpus_dir(d.corpus_train, d.corpus_dev, d.corpus_test, d.corpus_seed,
                               d.cache_dir)  # fmt: skip
        if folder.is_dir():
            yield "ok", "data", f"built-in corpus cached in {folder}"
        else:
            build = f"--train {d.corpus_train} --dev {d.corpus_dev} --test {d.corpus_test}"
            build += f" --seed {d.corpus_seed}" + (
                f" --cache-dir {d.cache_dir}" if d.cache_dir else ""
            )
            yield (
                "warn",
                "data",
                (
                    f"built-in corpus not built yet: the first job builds it into {folder}; "
                    f"or now: python -m lmu_asr.corpus {build}"
                ),
            )
    elif d.source == "manifest":
        for name in ("manifest", "dev_manifest", "test_manifest"):
            path = getattr(d, name)
            if path is None:
                continue
            if Path(path).is_file():
                yield "ok", "data", f"data.{name}: {path}"
            else:
                yield "FAIL", "data", f"data.{name}: {path} does not exist"
    elif d.source == "prepared":
        info = Path(d.dir) / "prepared.json"
        if info.is_file():
            splits = json.loads(info.read_text())["splits"]
            hours = ", ".join(f"{k} {v['hours']:.1f} h" for k, v in splits.items())
            yield "ok", "data", f"data.dir: {d.dir} prepared ({hours})"
        else:
            why = (
                "unfinished: run the prepare again"
                if any(Path(d.dir).glob("*/progress.json"))
                else "missing"
            )
            yield "FAIL", "data", f"data.dir: {info} {why} (python -m lmu_asr.prepare)"
    elif d.hf_path:
        first = Path(d.hf_path.replace("{split}", d.hf_train_split))
        ok = first.exists() or any(first.parent.glob(first.name))
        yield (
            ("ok" if ok else "FAIL"),
            "data",
            f"data.hf_path: {first}" + ("" if ok else " does not exist"),
        )
    else:
        has_token = "HF_TOKEN" in os.environ
        yield (
            ("ok" if has_token else "warn"),
            "data",
            (
                f"{d.hf_name} from the hub"
                + ("" if has_token else ": HF_TOKEN is not set (GigaSpeech is gated)")
            ),
        )


def run_checks(cfg: Config, slurm: bool = True) -> list[Check]:
    checks: list[Callable[[], Iterator[Check]]] = [check_torch]
    if slurm:
        checks.append(check_slurm)
    checks += [lambda: check_tracking(cfg), lambda: check_paths(cfg), lambda: check_data(cfg)]
    return [c for check in checks for c in check()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmu_asr.doctor", description=__doc__)
    parser.add_argument("--no-slurm", action="store_true", help="skip the SLURM checks")
    parser.add_argument("overrides", nargs="*", help="launch overrides, e.g. data=manifest ...")
    args = parser.parse_args(argv)
    from lmu_asr.launch import compose_config  # Hydra's compose; validates every group

    try:
        cfg = compose_config(args.overrides)
    except Exception as err:  # a bad override or value: that is the finding
        print(f"FAIL  config    {err}")
        return 1
    results = [("ok", "config", "composes and validates")] + run_checks(cfg, not args.no_slurm)
    for status, what, detail in results:
        print(f"{status:<5} {what:<9} {detail}")
    return 1 if any(status == "FAIL" for status, _, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
