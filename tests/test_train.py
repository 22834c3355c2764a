"""The main job end to end, in real subprocesses: `python -m lmu_asr.launch` on a small built-in
corpus; stop with SIGTERM and resume; exact resume; broken checkpoints; refused resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmu_asr.checkpoint import list_checkpoints, load_checkpoint
from lmu_asr.corpus import build_corpus

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


def test_run_dir_holds_results_and_exact_resume(tmp_path, corpus_env):
    """N steps straight equal k steps + save + resume in a fresh process, bitwise on CPU."""
    common = ["optim.schedule=constant", "optim.warmup_steps=2", "trainer.eval_every=5"]
    common += ["tracking=off"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(straight, corpus_env, *common, "trainer.max_steps=10")
    out = launch(resumed, corpus_env, *common, "trainer.max_steps=5")
    assert "split" in out.stdout and "WER" in out.stdout  # the final table
    out = launch(resumed, corpus_env, *common, "trainer.max_steps=10")
    assert "resumed from" in out.stderr + out.stdout

    for run in (straight, resumed):
        assert (run / ".hydra" / "config.yaml").is_file()
        assert (run / "train.log").is_file()
        results = json.loads((run / "results.json").read_text())
        assert results["steps"] == 10 and results["dev_cer"] >= 0 and results["test_wer"] >= 0
        lines = (run / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines]
        assert steps and steps == sorted(steps)
    a, b = (list_checkpoints(r)[-1] for r in (straight, resumed))
    assert a.name == b.name == "step-00000010"
    for item in ("model", "optimizer"):
        assert_bitwise_equal(tensors(a, item), tensors(b, item), item)
    sa, sb = tensors(a, "train_state"), tensors(b, "train_state")
    for key in ("step", "epoch", "batch_in_epoch", "best_metric", "best_step"):
        assert sa[key] == sb[key], key


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {metrics}")


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


def test_broken_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus_env):
    run_dir = tmp_path / "run"
    common = ["tracking=off", "trainer.eval_every=100", "checkpoint.every_steps=3"]
    launch(run_dir, corpus_env, *common, "trainer.max_steps=6", "checkpoint.keep_last=3")
    ckpts = list_checkpoints(run_dir)
    assert [c.name for c in ckpts] == ["step-00000003", "step-00000006"]
    model_pt = ckpts[-1] / "model.pt"
    data = bytearray(model_pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_pt.write_bytes(bytes(data))
    out = launch(run_dir, corpus_env, *common, "trainer.max_steps=7")
    text = out.stdout + out.stderr
    assert "step-00000006" in text  # the warning names the broken checkpoint
    assert "(step 3," in text  # and training resumed from the previous one

    (list_checkpoints(run_dir)[-1] / "COMPLETE").unlink()  # newest now incomplete
    out = launch(run_dir, corpus_env, *common, "trainer.max_steps=8")
    assert "resumed from" in out.stdout + out.stderr


def test_resume_with_another_architecture_is_refused(tmp_path, corpus_env):
    run_dir = tmp_path / "run"
    launch(run_dir, corpus_env, "tracking=off", "trainer.max_steps=2", "trainer.eval_every=2")
    out = launch(
        run_dir, corpus_env, "tracking=off", "trainer.max_steps=4", "model.order=8", check=False
    )
    assert out.returncode != 0
    assert "refusing to resume" in out.stderr and "model.order" in out.stderr
    # runtime-only settings may change
    launch(run_dir, corpus_env, "tracking=off", "trainer.max_steps=3", "trainer.log_every=1")


def test_evaluate_and_transcribe_a_trained_checkpoint(tmp_path, corpus_env):
    run_dir = tmp_path / "run"
    launch(run_dir, corpus_env, "tracking=off", "trainer.max_steps=4", "trainer.eval_every=2")
    manifest = next(Path(corpus_env["LMU_ASR_CACHE"]).glob("*/test.jsonl"))
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "lmu_asr.evaluate", f"checkpoint={run_dir}", "data=manifest"]
    cmd += [f"data.manifest={manifest}", "decoder=beam", "beam.beam_size=4"]
    cmd += [f"report={report}"]
    out = subprocess.run(cmd, env=corpus_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "WER" in out.stdout and "CER" in out.stdout
    data = json.loads(report.read_text())
    assert data["totals"]["utterances"] == 8 and data["decoder"] == "beam"
    row = data["utterances"][0]
    assert {"id", "ref", "hyp", "word_errors", "char_errors", "alignment"} <= row.keys()
    assert row["ref"]  # references are the manifest's transcripts

    wav = manifest.parent / json.loads(manifest.read_text().splitlines()[0])["audio"]
    cmd = [sys.executable, "-m", "lmu_asr.transcribe", f"checkpoint={run_dir}", f"audio=[{wav}]"]
    out = subprocess.run(cmd, env=corpus_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith(str(wav)), out.stderr

    missing = subprocess.run(
        [sys.executable, "-m", "lmu_asr.evaluate", f"checkpoint={tmp_path}/nope"],
        env=corpus_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0 and "nope" in missing.stderr
