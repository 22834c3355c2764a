"""Training state and atomic, verified checkpoints in `run_dir/checkpoints/step-XXXXXXXX/`.

A checkpoint folder holds one `<name>.pt` per item, `meta.json` (step, time, torch version,
size + sha256 per file) and, written last, the marker `COMPLETE`. Only folders with the marker
count; everything is loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmu_asr.config import Config

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# Leftovers of a writer: `.tmp-` (being written) and `.old-` (same-step checkpoint being replaced).
_WRITER_DIR = re.compile(r"^\.(tmp|old)-step-(\d{8,})-(.+)-(\d+)$")
_STALE_AFTER_S = 3600.0  # a writer on another host that has not written for this long is dead
_SAFE_LEAVES = (bool, int, float, complex, str, bytes, bytearray, type(None), torch.dtype)
_SAFE_CONTAINERS = (dict, OrderedDict, Counter, list, tuple, set, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or is missing, incomplete or corrupt."""


@dataclass
class CheckpointConfig:
    every_steps: int = 200
    every_minutes: float = 10.0  # also save after this much training time; 0 = by steps only
    keep_last: int = 2
    keep_best: bool = True

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {self.every_steps}")
        if self.every_minutes < 0:
            raise ValueError(f"checkpoint.every_minutes must be >= 0, got {self.every_minutes}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


def _check_weights_only(obj: Any, where: str) -> None:
    """Refuse, before anything is written, what torch.load(weights_only=True) would refuse."""
    if isinstance(obj, (torch.Tensor, torch.device)) or type(obj) in _SAFE_LEAVES:
        return
    if type(obj) in _SAFE_CONTAINERS:
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    t = type(obj)
    raise CheckpointError(
        f"{where} is a {t.__module__}.{t.__qualname__}, which torch.load(weights_only=True) "
        "cannot load; convert it to tensors / python numbers / str / lists / dicts"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network file systems do not support fsync on a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _file_info(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _write_file(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f) if callable(write) else f.write(write)
        f.flush()
        os.fsync(f.fileno())


_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _explain(error: BaseException, root: Path, step: int, doing: str) -> str:
    """The one line a researcher reads when a save fails: what is full or unwritable, and what
    to do about it."""
    e: BaseException | None = error
    while e is not None and not isinstance(e, OSError):  # torch.save raises a RuntimeError
        e = e.__cause__ or e.__context__  # ("unexpected pos ...") over the write's OSError
    previous = latest_checkpoint(root.parent)
    resume = f"it resumes from {previous.name}" if previous else "it starts from step 0"
    again = f"then run the same command again ({resume}, which is intact)"
    what = f"while saving checkpoint step {step} ({doing}: {e.strerror if e else error})"
    if isinstance(e, OSError) and e.errno in _FULL:
        try:
            free = f"{shutil.disk_usage(root).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        return (
            f"no space left on device (or quota exceeded) for {root} ({free}) {what}; free "
            f"space there or set hydra.run.dir to a folder on a larger file system, {again}"
        )
    if isinstance(e, OSError) and e.errno in _READ_ONLY:
        return (
            f"cannot write to {root} {what}; make it writable or set hydra.run.dir to a "
            f"writable folder, {again}"
        )
    return (
        f"saving checkpoint step {step} failed while {doing} ({error}); the temp folder was "
        f"removed and the previous checkpoints in {root} are intact"
    )


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where checkpoint `step` of `run_dir` lives (complete only with its marker)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders (with the marker), oldest step first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = list_checkpoints(run_dir)
    return done[-1] if done else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    items: Mapping[str, Any],
    keep_last: int,
    best_step: int | None = None,
) -> Path:
    """Write `items` (objects with `state_dict()` or dicts) as checkpoint `step`; prune old ones.

    The folder becomes visible under its final name only when fully written and fsynced; the
    marker is written last. On failure the temp folder is removed and the previous checkpoints
    are untouched. Saving an existing step replaces it.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    states = {}
    for name, obj in items.items():
        if not name or not re.fullmatch(r"[\w.-]+", name) or name == "meta":
            raise ValueError(f"checkpoint item name {name!r} must be a plain file name")
        state = obj.state_dict() if hasattr(obj, "state_dict") else obj
        _check_weights_only(state, f"checkpoint item {name!r}")
        states[name] = state

    final = checkpoint_dir(run_dir, step)
    root = final.parent
    writer = f"step-{step:08d}-{_host()}-{os.getpid()}"
    tmp, old = root / f".tmp-{writer}", root / f".old-{writer}"
    shutil.rmtree(tmp, ignore_errors=True)
    doing, moved = "creating the temp folder", False
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        files = {}
        for name, state in states.items():
            doing = f"writing {name}.pt"
            _write_file(tmp / f"{name}.pt", lambda f, s=state: torch.save(s, f))
            files[f"{name}.pt"] = _file_info(tmp / f"{name}.pt")
        doing = "writing meta.json"
        meta = {"step": step, "time": time.time(), "torch": torch.__version__, "files": files}
        _write_file(tmp / "meta.json", json.dumps(meta, indent=1).encode())
        _fsync_dir(tmp)
        doing = f"moving it to {final.name}"
        if final.exists():  # same step again (resume, then save): move the old one aside
            os.rename(final, old)
        os.rename(tmp, final)
        moved = True
        doing = f"writing {final.name}/{MARKER}"
        _write_file(final / MARKER, f"step {step}\n".encode())
        _fsync_dir(final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved:  # the marker could not be written: this checkpoint does not count
            (final / MARKER).unlink(missing_ok=True)
            shutil.rmtree(final, ignore_errors=True)
        if old.exists():  # put the replaced checkpoint back
            os.rename(old, final)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
            raise
        raise CheckpointError(_explain(e, root, step, doing)) from e
    shutil.rmtree(old, ignore_errors=True)
    _prune(root, final, keep_last, best_step)
    return final


def _host() -> str:
    return re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"


def _writer_is_dead(folder: Path, host: str, pid: int) -> bool:
    if host == _host() and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    try:
        newest = max(p.stat().st_mtime for p in [folder, *folder.iterdir()])
    except OSError:
        return False
    return time.time() - newest > _STALE_AFTER_S


def _prune(root: Path, saved: Path, keep_last: int, best_step: int | None) -> None:
    """Keep the last `keep_last` complete checkpoints, `best_step`'s and the one just saved;
    remove incomplete step folders and the leftovers of dead writers."""
    # first the leftovers, so that a restored checkpoint counts among the ones to keep
    for p in list(root.iterdir()):
        m = _WRITER_DIR.match(p.name)
        if m and _writer_is_dead(p, m.group(3), int(m.group(4))):
            final = root / f"step-{m.group(2)}"
            if m.group(1) == "old" and (p / MARKER).is_file() and not (final / MARKER).is_file():
                # the writer died while replacing this checkpoint: restore the old one
                shutil.rmtree(final, ignore_errors=True)
                os.rename(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
    done = list_checkpoints(root.parent)
    keep = {saved, *done[-keep_last:]}
    if best_step is not None and best_step >= 0:
        keep.add(checkpoint_dir(root.parent, best_step))
    for p in root.iterdir():
        if _STEP_DIR.match(p.name) and p not in keep:
            log.debug("removing checkpoint %s", p)
            (p / MARKER).unlink(missing_ok=True)  # killed half-way, it no longer counts
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Verify marker, sizes and checksums of checkpoint folder `path`, then load every item."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MARKER} marker")
    try:
        files = json.loads((path / "meta.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read meta.json ({e})") from e
    out = {}
    for fname, info in files.items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: file {fname} is missing")
        actual = _file_info(f)
        if actual != info:
            raise CheckpointError(
                f"checkpoint {path}: file {fname} is truncated or corrupt ({actual['size']} "
                f"bytes; size or sha256 differs from meta.json)"
            )
        try:
            out[fname.removesuffix(".pt")] = torch.load(
                f, map_location=map_location, weights_only=True
            )
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path}: cannot load {fname} with weights_only=True ({e})"
            ) from e
    return out


def load_latest(run_dir: Path, map_location: Any = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """Newest complete checkpoint that loads, skipping corrupt ones; None if there is none.
    Raises CheckpointError if some exist but none loads (no silent restart from scratch)."""
    done = list_checkpoints(run_dir)
    errors = []
    for path in reversed(done):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("skipping corrupt checkpoint %s: %s", path, e)
            errors.append(str(e))
    if done:
        raise CheckpointError(f"no checkpoint in {run_dir} loads: " + "; ".join(errors))
    return None


def model_config(cfg: Config) -> dict:
    """What a checkpoint needs to rebuild its model (evaluate, transcribe, resume checks)."""
    return {"model": asdict(cfg.model), "features": asdict(cfg.features)} | {
        "sample_rate": cfg.data.sample_rate
    }


def check_architecture(saved: dict, cfg: Config, path: Path) -> None:
    """Refuse to resume into a different model; runtime-only settings may change."""
    runtime = {"name", "dropout", "activation_checkpointing"}  # model fields that may change
    runtime |= {"freq_masks", "freq_width", "time_masks", "time_width"}  # SpecAugment
    now = model_config(cfg)
    diff = {
        f"{group}.{k}": (saved[group].get(k), v)
        for group in ("model", "features")
        for k, v in now[group].items()
        if k not in runtime and saved[group].get(k) != v
    }
    if saved.get("sample_rate") != now["sample_rate"]:  # the frontend's window and filterbank
        diff["data.sample_rate"] = (saved.get("sample_rate"), now["sample_rate"])
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} != config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"refusing to resume from {path}: the model architecture differs ({details}). "
            "Use a new run directory (hydra.run.dir=...) or the checkpoint's settings."
        )
