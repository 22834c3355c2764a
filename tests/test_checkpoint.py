import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from lmu_asr.checkpoint import (
    MARKER,
    CheckpointConfig,
    CheckpointError,
    check_architecture,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    model_config,
    save_checkpoint,
)
from lmu_asr.config import Config
from lmu_asr.state import TrainState


def _items(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "train_state": TrainState(step=seed)}


def _steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(run_dir)]


def _dir_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_config_validation():
    assert CheckpointConfig().keep_last == 2
    with pytest.raises(ValueError, match="keep_last.*0"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ValueError, match="every_steps.*-1"):
        CheckpointConfig(every_steps=-1)


# What a resumed run may change: regularisation and memory-saving settings, not the weights'
# shapes or what they mean. Every other model / features field, and the sample rate, is refused.
MAY_CHANGE = {"model.name", "model.dropout", "model.activation_checkpointing"}
MAY_CHANGE |= {f"features.{k}" for k in ("freq_masks", "freq_width", "time_masks", "time_width")}


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    return f"{value}-changed"


def test_resume_architecture_check_field_by_field(tmp_path):
    saved = model_config(Config())
    check_architecture(saved, Config(), tmp_path)  # the same config resumes
    fields_ = [(group, f.name) for group in ("model", "features", "data")
               for f in fields(getattr(Config(), group))]  # fmt: skip
    refused, allowed = set(), set()
    for group, name in fields_:
        if group == "data" and name != "sample_rate":
            continue  # where the data comes from is not part of the model
        cfg = Config()
        old = getattr(getattr(cfg, group), name)
        setattr(getattr(cfg, group), name, new := _changed(old))
        try:
            check_architecture(saved, cfg, tmp_path / "step-00000007")
            allowed.add(f"{group}.{name}")
        except ValueError as err:
            refused.add(f"{group}.{name}")
            assert f"{group}.{name}: checkpoint {old!r} != config {new!r}" in str(err)
            assert str(err).startswith(f"refusing to resume from {tmp_path / 'step-00000007'}")
    assert allowed == MAY_CHANGE
    assert "model.order" in refused and "features.n_mels" in refused and len(refused) > 20


def test_round_trip_model_optimizer_train_state_and_rng(tmp_path):
    items = _items()
    state = items["train_state"]
    state.step, state.epoch, state.batch_in_epoch, state.best_step = 7, 2, 3, 5
    state.best_metric, state.elapsed_s, state.run_id = 0.25, 12.5, "abc123"
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    state.capture_rng()
    expected = (torch.rand(5), random.random(), np.random.rand(3))

    path = save_checkpoint(tmp_path, 7, items, keep_last=2)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert (path / MARKER).is_file() and latest_checkpoint(tmp_path) == path
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and set(meta["files"]) == {
        "model.pt",
        "optimizer.pt",
        "train_state.pt",
    }
    torch.rand(100), random.random(), np.random.rand(7)  # move every generator on

    loaded_path, ckpt = load_latest(tmp_path)
    assert loaded_path == path
    fresh = _items(seed=99)
    fresh["model"].load_state_dict(ckpt["model"])
    fresh["optimizer"].load_state_dict(ckpt["optimizer"])
    restored = TrainState()
    restored.load_state_dict(ckpt["train_state"])
    for a, b in zip(fresh["model"].parameters(), items["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    exp_avg = items["optimizer"].state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh["optimizer"].state_dict()["state"][0]["exp_avg"], exp_avg)
    assert (restored.step, restored.epoch, restored.batch_in_epoch) == (7, 2, 3)
    assert (restored.best_metric, restored.best_step, restored.run_id) == (0.25, 5, "abc123")
    restored.restore_rng()
    assert torch.equal(torch.rand(5), expected[0])
    assert random.random() == expected[1]
    assert np.array_equal(np.random.rand(3), expected[2])


def test_train_state_rejects_unknown_keys():
    with pytest.raises(KeyError, match="bogus"):
        TrainState().load_state_dict({"step": 1, "bogus": 2})


def test_folder_without_marker_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 100, _items(1), keep_last=3)
    newest = save_checkpoint(tmp_path, 200, _items(2), keep_last=3)
    (newest / MARKER).unlink()
    assert _steps(tmp_path) == [100]
    path, ckpt = load_latest(tmp_path)
    assert path.name == "step-00000100" and ckpt["train_state"]["step"] == 1
    with pytest.raises(CheckpointError, match=r"step-00000200.*COMPLETE"):
        load_checkpoint(newest)


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_corrupt_file_is_detected_and_previous_loaded(tmp_path, damage, caplog):
    save_checkpoint(tmp_path, 100, _items(1), keep_last=3)
    newest = save_checkpoint(tmp_path, 200, _items(2), keep_last=3)
    f = newest / "model.pt"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=r"step-00000200.*model\.pt"):
        load_checkpoint(newest)
    path, ckpt = load_latest(tmp_path)
    assert path.name == "step-00000100" and ckpt["train_state"]["step"] == 1
    assert "step-00000200" in caplog.text


def test_nothing_loadable(tmp_path):
    assert load_latest(tmp_path) is None and latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="nowhere.*does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    only = save_checkpoint(tmp_path, 100, _items(1), keep_last=1)
    (only / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is missing"):
        load_latest(tmp_path)  # complete ones exist but none loads: no silent restart


def test_prune_keeps_last_k_plus_best_and_never_the_newest(tmp_path):
    for step in range(100, 700, 100):
        save_checkpoint(tmp_path, step, _items(), keep_last=2, best_step=200)
    assert _steps(tmp_path) == [200, 500, 600]
    save_checkpoint(tmp_path, 700, _items(), keep_last=1)
    assert _steps(tmp_path) == [700]
    # resumed from an older step (700 was, say, corrupt): both the newest and the new one stay
    save_checkpoint(tmp_path, 650, _items(), keep_last=1)
    assert _steps(tmp_path) == [650, 700]


def test_stale_writer_folders_are_removed(tmp_path):
    save_checkpoint(tmp_path, 100, _items(), keep_last=2)
    root = tmp_path / "checkpoints"
    recent = root / ".tmp-step-00000200-otherhost-123"
    old = root / ".tmp-step-00000300-otherhost-456"
    incomplete = root / "step-00000150"
    for d in (recent, old, incomplete):
        d.mkdir()
        (d / "model.pt").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(old / "model.pt", (two_hours_ago, two_hours_ago))
    os.utime(old, (two_hours_ago, two_hours_ago))
    save_checkpoint(tmp_path, 400, _items(), keep_last=2)
    assert recent.exists()  # another host's writer may still be alive
    assert not old.exists() and not incomplete.exists()
    assert _steps(tmp_path) == [100, 400]


def test_same_step_twice_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 100, {"s": {"x": torch.tensor(1)}}, keep_last=2)
    save_checkpoint(tmp_path, 100, {"s": {"x": torch.tensor(2)}}, keep_last=2)
    assert _steps(tmp_path) == [100]
    assert load_latest(tmp_path)[1]["s"]["x"].item() == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000100"]


@pytest.mark.parametrize("second_step", [200, 100])
def test_write_failure_leaves_previous_checkpoints_intact(tmp_path, monkeypatch, second_step):
    first = save_checkpoint(tmp_path, 100, _items(1), keep_last=2)
    before = _dir_bytes(first)
    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a tensor")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, second_step, _items(2), keep_last=1)
    msg = str(info.value)
    assert "optimizer.pt" in msg and "No space left" in msg and "intact" in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000100"]
    assert _dir_bytes(first) == before
    assert load_latest(tmp_path)[1]["train_state"]["step"] == 1


class NotATensor:
    pass


def test_arbitrary_objects_refused_at_save(tmp_path):
    with pytest.raises(CheckpointError, match=r"'extra'\['obj'\].*NotATensor.*weights_only"):
        save_checkpoint(tmp_path, 1, {"extra": {"obj": NotATensor()}}, keep_last=1)
    state = TrainState(best_metric=np.float64(0.5))  # a float subclass that would not load
    with pytest.raises(CheckpointError, match=r"best_metric.*numpy.float64"):
        save_checkpoint(tmp_path, 1, {"train_state": state}, keep_last=1)
    assert list_checkpoints(tmp_path) == []


def test_arbitrary_objects_refused_at_load(tmp_path):
    folder = tmp_path / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    torch.save({"obj": NotATensor()}, folder / "extra.pt")
    data = (folder / "extra.pt").read_bytes()
    files = {"extra.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    (folder / "meta.json").write_text(json.dumps({"step": 1, "files": files}))
    (folder / MARKER).write_text("step 1\n")
    with pytest.raises(CheckpointError, match=r"step-00000001.*extra\.pt.*weights_only"):
        load_checkpoint(folder)


KILLED_WRITER = """
import os, sys, time
from pathlib import Path
import torch
from lmu_asr import checkpoint as ck

run_dir, phase, sentinel = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
items = {"a": {"w": torch.ones(1000)}, "b": {"w": torch.zeros(1000)}}
ck.save_checkpoint(run_dir, 100, items, keep_last=2)
real_save, real_rename = torch.save, os.rename

def hang():
    sentinel.touch()
    time.sleep(600)

def save(obj, f):  # the second item: half written, then the job is killed
    if f.name.endswith("b.pt"):
        f.write(b"PK half a zip"); f.flush(); hang()
    real_save(obj, f)

def rename(a, b):  # renamed to step-00000200 but killed before the marker
    real_rename(a, b); hang()

if phase == "write":
    torch.save = save
else:
    os.rename = rename
ck.save_checkpoint(run_dir, 200, items, keep_last=2)
"""


def test_sigkill_mid_save_never_leaves_a_complete_looking_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(KILLED_WRITER))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = {}
    for phase in ("write", "rename"):  # both at once: each pays the torch import
        run, sentinel = tmp_path / phase, tmp_path / f"{phase}.ready"
        cmd = [sys.executable, str(script), str(run), phase, str(sentinel)]
        procs[phase] = (subprocess.Popen(cmd, env=env), run, sentinel)
    for proc, _, sentinel in procs.values():
        deadline = time.time() + 120
        while not sentinel.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert sentinel.exists(), f"writer exited early with {proc.returncode}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    write_run, rename_run = procs["write"][1], procs["rename"][1]
    assert any(
        p.name.startswith(".tmp-step-00000200") for p in (write_run / "checkpoints").iterdir()
    )
    assert (rename_run / "checkpoints" / "step-00000200" / "b.pt").exists()
    for run in (write_run, rename_run):
        assert _steps(run) == [100]
        path, ckpt = load_latest(run)
        assert path.name == "step-00000100" and ckpt["b"]["w"].sum() == 0
        save_checkpoint(run, 300, {"a": {"w": torch.ones(3)}}, keep_last=2)  # next job cleans up
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
            "step-00000100",
            "step-00000300",
        ]
