"""The main job end to end, in real subprocesses: `python -m lmu_asr.launch` on a small built-in
corpus; stop with SIGTERM and resume; exact resume; broken checkpoints; refused resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmu_asr.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, save_checkpoint
from lmu_asr.corpus import build_corpus
from lmu_asr.text import VOCAB

pytestmark = pytest.mark.slow

SMALL = ["model=lmu_tiny", "data.corpus_train=48", "data.corpus_dev=8", "data.corpus_test=8"]
SMALL += ["data.num_workers=0", "data.max_frames=3000", "trainer.threads=1", "trainer.log_every=2"]
SMALL += ["trainer.max_minutes=0", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def corpus_env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    build_corpus(48, 8, 8, seed=0, cache_dir=str(cache), progress=False)
    return os.environ | {"LMU_ASR_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def launch(run_dir: Path, env: dict, *overrides: str, check: bool = True, **kw):
    cmd = [sys.executable, "-m", "lmu_asr.launch", *SMALL, f"hydra.run.dir={run_dir}", *overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def tensors(path: Path, item: str) -> dict:
    return load_checkpoint(path)[item]


def assert_bitwise_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


LEARNING = ("step", "train/loss", "train/lr", "train/grad_norm", "train/epoch", "dev/", "final/")


def logged_values(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock and system metrics: what training computed."""
    return [{k: v for k, v in m.items() if k.startswith(LEARNING)} for m in read_metrics(run_dir)]


def test_sigterm_between_checkpoints_then_resume_equals_a_straight_run(tmp_path, corpus_env):
    """A run stopped by SIGTERM between two checkpoints and started again (the same command, in
    a fresh process) equals a straight run bitwise on CPU: with the cosine schedule, a time
    budget (large, so it never ends the run), waveform augmentation (its draws come from the
    step's seeds) and a data loader worker (the straight run reads in-process: the results must
    not depend on it either)."""
    common = ["optim.schedule=cosine", "optim.warmup_steps=2", "trainer.max_minutes=10000"]
    steps = 16  # about 60 ms each: a SIGTERM at step 1 leaves 15 steps to stop in, under load too
    common += [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}"]
    common += ["checkpoint.every_steps=1000"]
    common += ["trainer.log_every=1", "tracking=off", "augment=demo"]  # its draws resume too
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kw = {"env": corpus_env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    cmd = [sys.executable, "-m", "lmu_asr.launch", *SMALL, *common]
    straight_proc = subprocess.Popen([*cmd, f"hydra.run.dir={straight}"], **kw)  # meanwhile
    cmd += ["data.num_workers=1", f"hydra.run.dir={resumed}"]
    proc = subprocess.Popen(cmd, **kw)
    wait_for_step(resumed, 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "run the same command again to resume" in out, out
    (stopped_at,) = list_checkpoints(resumed)  # the stop saved; no other checkpoint before it
    stop = tensors(stopped_at, "train_state")["step"]
    assert 1 <= stop < steps, out
    assert not (resumed / "results.json").exists()
    again = subprocess.run(cmd, **kw, timeout=600)
    out = again.stdout
    assert again.returncode == 0 and f"(step {stop}," in out, out  # resumed where it stopped
    assert "WER" in out and "CER" in out  # the final table
    out, _ = straight_proc.communicate(timeout=600)
    assert straight_proc.returncode == 0, out

    for run in (straight, resumed):
        assert (run / ".hydra" / "config.yaml").is_file()
        assert (run / "train.log").is_file()
    a, b = (list_checkpoints(r)[-1] for r in (straight, resumed))
    assert a.name == b.name == f"step-{steps:08d}"
    for item in ("model", "optimizer"):
        assert_bitwise_equal(tensors(a, item), tensors(b, item), item)
    sa, sb = tensors(a, "train_state"), tensors(b, "train_state")
    assert sa["epoch"] >= 1  # an epoch boundary crossed; the stop was mid-epoch
    for key in ("step", "epoch", "batch_in_epoch", "best_metric", "best_step"):
        assert sa[key] == sb[key], key
    # every step logged once, with the same loss, learning rate, gradient norm and dev metrics
    logged = [logged_values(r) for r in (straight, resumed)]
    assert [m["step"] for m in logged[0] if "train/loss" in m] == list(range(1, steps + 1))
    assert logged[0] == logged[1]
    lrs = [m["train/lr"] for m in logged[0] if "train/lr" in m]
    assert lrs[2] > lrs[-1] > 0  # cosine decay
    results = [json.loads((r / "results.json").read_text()) for r in (straight, resumed)]
    assert results[0]["steps"] == results[1]["steps"] == steps
    assert (results[1]["starts"], results[1]["stops"][0]["step"]) == (2, stop)
    for key in ("dev_cer", "dev_wer", "test_cer", "test_wer", "test_wer_lm", "best_step"):
        assert results[0][key] == results[1][key], key
    for key in ("unseen_cer", "unseen_wer", "unseen_wer_lm", "unseen_skipped"):  # held-out voices
        assert results[0][key] == results[1][key] is not None, key


def wait_for(proc: subprocess.Popen, done: Callable[[], bool], what: str, timeout: float = 300):
    """Polls `done` every 50 ms while `proc` runs; fails if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if done():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {what}")


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300):
    metrics = run_dir / "metrics.jsonl"

    def reached() -> bool:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        return bool(lines) and json.loads(lines[-1])["step"] >= step

    wait_for(proc, reached, f"step {step} in {metrics}", timeout)


def test_sigterm_saves_and_the_same_command_resumes_in_the_same_mlflow_run(tmp_path, corpus_env):
    run_dir = tmp_path / "run"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*SMALL, f"hydra.run.dir={run_dir}", f"tracking.uri={uri}", "trainer.max_steps=100000"]
    args += ["trainer.eval_every=100000", "checkpoint.every_steps=100000"]
    cmd = [sys.executable, "-m", "lmu_asr.launch", *args]
    kw = {"env": corpus_env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}

    stops = []
    for _ in range(2):  # the same command twice: the second resumes, then is stopped again
        proc = subprocess.Popen(cmd, **kw)
        wait_for_step(run_dir, (stops[-1] if stops else 0) + 4, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "run the same command again to resume" in out
        if stops:
            assert f"(step {stops[-1]}," in out and "resumed from" in out
        ckpt = list_checkpoints(run_dir)[-1]
        stops.append(tensors(ckpt, "train_state")["step"])
        assert not (run_dir / "results.json").exists()
    assert stops[1] > stops[0] >= 4

    import mlflow

    run_id = tensors(list_checkpoints(run_dir)[-1], "train_state")["run_id"]
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(run_id, "train/loss")
    logged = sorted(m.step for m in history)
    assert logged[0] <= stops[0] < logged[-1]  # both processes logged into the one run
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_a_time_limit_warning_as_the_finished_job_exits_leaves_it_successful(tmp_path, corpus_env):
    """SLURM's warning (USR2) may come while a job that has just finished exits: CI saw a sweep
    task log 'Job completed successfully' and die of USR2 during Python's shutdown, FAILED in
    sacct. Warned again and again from its 'finished' stop until it has exited, it exits 0."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmu_asr.launch", *SMALL, f"hydra.run.dir={run_dir}"]
    cmd += ["trainer.max_steps=4", "trainer.eval_every=4", "trainer.final_lm=false", "tracking=off"]
    proc = subprocess.Popen(cmd, env=corpus_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    life = run_dir / "lifecycle.jsonl"
    wait_for(proc, lambda: life.exists() and '"finished"' in life.read_text(), f"finish in {life}")
    warned = 0
    while proc.poll() is None:
        proc.send_signal(signal.SIGUSR2)
        warned += 1
        time.sleep(0.02)
    out, _ = proc.communicate()
    assert proc.returncode == 0 and warned > 1, (proc.returncode, warned, out.decode()[-2000:])


def started_at(run_dir: Path) -> list[int]:
    """The step each start of the job began from (lifecycle.jsonl)."""
    lines = (run_dir / "lifecycle.jsonl").read_text().splitlines()
    return [e["step"] for e in map(json.loads, lines) if e["event"] == "start"]


def test_broken_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus_env):
    run_dir = tmp_path / "run"
    common = ["tracking=off", "trainer.eval_every=100", "checkpoint.every_steps=3"]
    common += ["trainer.final_lm=false", "checkpoint.keep_last=3"]
    launch(run_dir, corpus_env, *common, "trainer.max_steps=6")
    ckpts = list_checkpoints(run_dir)
    assert [c.name for c in ckpts] == ["step-00000003", "step-00000006"]
    model_pt = ckpts[-1] / "model.pt"
    data = bytearray(model_pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_pt.write_bytes(bytes(data))
    out = launch(run_dir, corpus_env, *common, "trainer.max_steps=7")
    text = out.stdout + out.stderr
    assert f"skipping corrupt checkpoint {ckpts[-1]}" in text  # the warning names it
    assert f"resumed from {ckpts[0]} (step 3," in text  # and training resumed from the previous
    assert started_at(run_dir) == [0, 3]
    # step 6 was trained again and its checkpoint replaced the broken one
    assert [c.name for c in list_checkpoints(run_dir)] == [f"step-0000000{i}" for i in (3, 6, 7)]
    assert tensors(ckpts[-1], "train_state")["step"] == 6

    (list_checkpoints(run_dir)[-1] / "COMPLETE").unlink()  # newest now incomplete
    out = launch(run_dir, corpus_env, *common, "trainer.max_steps=8")
    assert f"resumed from {ckpts[-1]} (step 6," in out.stdout + out.stderr
    assert started_at(run_dir) == [0, 3, 6]


def test_resume_with_another_architecture_is_refused(tmp_path, corpus_env):
    run_dir = tmp_path / "run"
    common = ["tracking=off", "trainer.final_lm=false"]
    launch(run_dir, corpus_env, *common, "trainer.max_steps=2", "trainer.eval_every=2")
    (saved,) = list_checkpoints(run_dir)
    changed = ["model.order=8", "features.n_mels=40", "model.dropout=0.0"]
    out = launch(run_dir, corpus_env, *common, "trainer.max_steps=4", *changed, check=False)
    assert out.returncode != 0
    message = next(line for line in out.stderr.splitlines() if "refusing to resume" in line)
    assert f"refusing to resume from {saved}: the model architecture differs" in message
    assert "model.order: checkpoint 16 != config 8" in message
    assert "features.n_mels: checkpoint 80 != config 40" in message
    assert "dropout" not in message  # it may change
    assert list_checkpoints(run_dir) == [saved] and started_at(run_dir) == [0]  # nothing ran
    # what may change: dropout, activation checkpointing, SpecAugment, the preset's name
    runtime = ["model.dropout=0.0", "model.activation_checkpointing=true", "model.name=renamed"]
    runtime += ["features.freq_masks=0", "features.freq_width=10", "features.time_masks=3"]
    runtime += ["features.time_width=0.1"]
    out = launch(run_dir, corpus_env, *common, "trainer.max_steps=3", *runtime)
    assert f"resumed from {saved} (step 2," in out.stdout + out.stderr
    assert started_at(run_dir) == [0, 2]
    assert tensors(list_checkpoints(run_dir)[-1], "train_state")["step"] == 3


def test_evaluate_and_transcribe_the_best_checkpoint(tmp_path, corpus_env):
    """`checkpoint=RUN_DIR` means its best checkpoint, not the newest; transcribe and evaluate
    give one file the same hypothesis."""
    from lmu_asr.transcribe import transcribe

    run_dir = tmp_path / "run"
    common = ["tracking=off", "trainer.max_steps=4", "trainer.eval_every=2"]
    launch(run_dir, corpus_env, *common, "trainer.final_lm=false")
    newest = list_checkpoints(run_dir)[-1]
    best = checkpoint_dir(run_dir, tensors(newest, "train_state")["best_step"])
    # training went on past the best: a newer, worse checkpoint whose model only says "e"
    items = load_checkpoint(best)
    items["model"]["encoder.head.bias"][VOCAB.index("e")] = 1e4
    items["train_state"]["step"] += 10
    worse = save_checkpoint(run_dir, items["train_state"]["step"], items, 10, best_step=-1)
    assert list_checkpoints(run_dir)[-1] == worse

    manifest = next(Path(corpus_env["LMU_ASR_CACHE"]).glob("*/test.jsonl"))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:2]]
    wavs = [manifest.parent / row["audio"] for row in rows]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "lmu_asr.evaluate", f"checkpoint={run_dir}", "data=manifest"]
    cmd += [f"data.manifest={manifest}", "decoder=beam", "beam.beam_size=4"]
    cmd += [f"report={report}"]
    out = subprocess.run(cmd, env=corpus_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "WER" in out.stdout and "CER" in out.stdout
    data = json.loads(report.read_text())
    assert data["checkpoint"] == str(best)
    assert data["totals"]["utterances"] == 8 and data["decoder"] == "beam"
    by_id = {row["id"]: row for row in data["utterances"]}
    first = by_id[rows[0]["id"]]
    assert {"id", "ref", "hyp", "word_errors", "char_errors", "alignment"} <= first.keys()
    assert first["ref"] == rows[0]["text"]  # the manifest's transcript

    audio = ",".join(map(str, wavs))
    cmd = [sys.executable, "-m", "lmu_asr.transcribe", f"checkpoint={run_dir}", f"audio=[{audio}]"]
    cmd += ["decoder=beam", "beam.beam_size=4"]
    out = subprocess.run(cmd, env=corpus_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = [line.split("\t") for line in out.stdout.splitlines()]
    assert printed == [[str(w), by_id[row["id"]]["hyp"]] for w, row in zip(wavs, rows, strict=True)]
    # the check can tell the two checkpoints apart
    assert any(hyp for _, hyp in printed)
    assert transcribe(worse, wavs) == ["e", "e"] != [hyp for _, hyp in printed]

    missing = subprocess.run(
        [sys.executable, "-m", "lmu_asr.evaluate", f"checkpoint={tmp_path}/nope"],
        env=corpus_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0 and "nope" in missing.stderr
