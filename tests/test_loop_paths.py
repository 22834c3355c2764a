"""Paths of the training loop that the other tests do not take: early stopping, the time budget
and its last validation, elapsed time across a restart, two ranks agreeing on a non-finite step
and on a stop request, a checkpoint whose replacement was killed, the MLflow status of a failed
and of a terminated run, each precision, and feature frames other than 10 ms.

train() runs in this process where the process boundary is not what is tested; the 2-rank job
and the killed checkpoint writer are real processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from lmu_asr.checkpoint import list_checkpoints, load_checkpoint, load_latest, save_checkpoint
from lmu_asr.data import Item, SkipCounter, Utterance
from lmu_asr.distributed import DistEnv
from lmu_asr.evaluate import split_loader
from lmu_asr.launch import compose_config
from lmu_asr.model import SpeechRecognizer
from lmu_asr.preemption import StopFlag
from lmu_asr.speech_dataset import SpeechDataset
from lmu_asr.text import encode
from lmu_asr.tracking import read_jsonl
from lmu_asr.train import train
from tests.test_ddp import free_port
from tests.test_train import SMALL, corpus_env, wait_for_step  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _alone():
    """train() in this process: no distributed or SLURM settings from outside, no report of
    plots at the end (seconds per run, and not what these tests are about), and the torch
    thread count of the other tests restored afterwards."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "SLURM_JOB_ID", "SLURM_STEP_NUM_TASKS"):
            mp.delenv(var, raising=False)
        mp.setattr("lmu_asr.train.write_report", lambda *args: [])
        yield
    torch.set_num_threads(threads)


def run(run_dir: Path, corpus_env: dict, *overrides: str, stop=None) -> dict:  # noqa: F811
    """train() in this process on the small corpus (no word LM at the end)."""
    cache = corpus_env["LMU_ASR_CACHE"]
    cfg = compose_config([*SMALL, f"data.cache_dir={cache}", "trainer.final_lm=false", *overrides])
    return train(cfg, run_dir, stop or StopFlag())


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric in metrics.jsonl."""
    return {r["step"]: r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if key in r}


def last_stop(run_dir: Path) -> tuple[str, int]:
    stop = read_jsonl(run_dir / "lifecycle.jsonl")[-1]
    return stop["reason"], stop["step"]


class StopAfter:
    """A SIGTERM that arrives during optimizer step `step` (train() polls once per step)."""

    def __init__(self, step: int) -> None:
        self.step, self.polls = step, 0

    @property
    def signum(self) -> int | None:
        self.polls += 1
        return signal.SIGTERM if self.polls >= self.step else None


def corpus_manifests(corpus_env: dict) -> dict[str, list[dict]]:  # noqa: F811
    """The rows of the small corpus's manifests, with absolute audio paths."""
    folder = next(Path(corpus_env["LMU_ASR_CACHE"]).glob("corpus-*/"))
    out = {}
    for split in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        out[split] = [r | {"audio": str(folder / r["audio"])} for r in rows]
    return out


def write_manifests(folder: Path, corpus_env: dict, extra_train: list[dict]) -> list[str]:  # noqa: F811
    """data=manifest overrides: the corpus's splits, `extra_train` appended to train."""
    rows = corpus_manifests(corpus_env)
    rows["train"] += extra_train
    paths = {}
    for split, split_rows in rows.items():
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return ["data=manifest", f"data.manifest={paths['train']}",
            f"data.dev_manifest={paths['dev']}", f"data.test_manifest={paths['test']}"]  # fmt: skip


# -- early stopping, time budget, elapsed time across a restart -------------------------------


def test_early_stopping_after_patience_evaluations_without_a_better_dev_metric(
    tmp_path,
    corpus_env,  # noqa: F811
):
    # a learning rate so small that no evaluation after the first can be better
    results = run(tmp_path, corpus_env, "tracking=off", "trainer.max_steps=12",
                  "trainer.eval_every=1", "trainer.patience=2", "optim.lr=1e-9")  # fmt: skip
    assert (results["status"], results["steps"], results["best_step"]) == ("early_stop", 3, 1)
    assert sorted(logged(tmp_path, "dev/cer")) == [1, 2, 3]
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "early_stop"
    assert last_stop(tmp_path) == ("early_stop", 3)
    assert list_checkpoints(tmp_path)[-1].name == "step-00000003"


def test_time_budget_stops_training_and_validates_its_last_steps(tmp_path, corpus_env):  # noqa: F811
    budget_s = 2.4
    results = run(tmp_path, corpus_env, "tracking=off", "trainer.max_steps=100000",
                  f"trainer.max_minutes={budget_s / 60}", "trainer.eval_every=100000",
                  "checkpoint.every_minutes=0", "checkpoint.every_steps=100000")  # fmt: skip
    steps = results["steps"]
    assert results["status"] == "budget" and 0 < steps < 100000
    assert budget_s <= results["train_minutes"] * 60 < budget_s + 60
    # the steps since the last periodic validation may be the best: validated before the end
    assert sorted(logged(tmp_path, "dev/cer")) == [steps]
    assert results["best_step"] == steps
    assert [c.name for c in list_checkpoints(tmp_path)] == [f"step-{steps:08d}"]
    assert last_stop(tmp_path) == ("budget", steps)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def terminated(tmp_path_factory, corpus_env, mlflow_uri):  # noqa: F811
    """A run stopped by SIGTERM in step 3 of 6, then the same run again with a time budget
    smaller than the time it had trained: (run dir, first result, MLflow status after it,
    the saved train state with the MLflow run id, second result)."""
    from mlflow import MlflowClient

    run_dir = tmp_path_factory.mktemp("terminated")
    common = ["trainer.max_steps=6", "trainer.eval_every=100", "checkpoint.every_steps=100"]
    common += [f"tracking.uri={mlflow_uri}"]
    first = run(run_dir, corpus_env, *common, stop=StopAfter(3))
    state = load_checkpoint(list_checkpoints(run_dir)[-1])["train_state"]
    state["run_id"] = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    status = MlflowClient(mlflow_uri).get_run(state["run_id"]).info.status
    budget_min = state["elapsed_s"] / 2 / 60
    second = run(run_dir, corpus_env, *common, f"trainer.max_minutes={budget_min:.6f}")
    return run_dir, first, status, state, second


def test_sigterm_saves_and_ends_the_mlflow_run_killed(terminated):
    run_dir, first, status, state, _ = terminated
    assert first == {"status": "stopped", "reason": "terminated", "step": 3}
    assert state["step"] == 3 and state["elapsed_s"] > 0
    assert status == "KILLED"


def test_elapsed_time_carries_across_a_restart(terminated, mlflow_uri):
    from mlflow import MlflowClient

    run_dir, _, _, state, second = terminated
    # the budget was spent before the restart: no step more, the time is the saved one
    assert (second["status"], second["steps"]) == ("budget", 3)
    assert second["train_minutes"] * 60 == pytest.approx(state["elapsed_s"])
    assert second["starts"] == 2
    assert [(s["reason"], s["step"]) for s in second["stops"]] == [("terminated", 3)]
    assert MlflowClient(mlflow_uri).get_run(state["run_id"]).info.status == "FINISHED"


def test_an_exception_ends_the_mlflow_run_failed(tmp_path, corpus_env, mlflow_uri):  # noqa: F811
    from mlflow import MlflowClient

    first = corpus_manifests(corpus_env)["train"][0]
    bad = first | {"id": "too-many-letters", "text": "a b " * 200}  # more letters than frames
    data = write_manifests(tmp_path, corpus_env, [bad])  # last: not in the feature statistics
    args = ["data.strict=true", "trainer.stats_utts=16", "trainer.max_steps=40"]
    args += ["trainer.eval_every=100", f"tracking.uri={mlflow_uri}"]
    with pytest.raises(ValueError, match="too-many-letters.*ctc infeasible"):
        run(tmp_path / "run", corpus_env, *data, *args)
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["run_id"]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FAILED"


# -- precision ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def precisions(tmp_path_factory, corpus_env) -> dict[str, tuple[Path, dict]]:  # noqa: F811
    """3 steps in each precision, the same data and seed: name -> (run dir, results)."""
    out = {}
    for name in ("fp32", "bf16", "fp16"):
        run_dir = tmp_path_factory.mktemp(name)
        args = ["trainer.max_steps=3", "trainer.eval_every=3", "trainer.log_every=1"]
        results = run(run_dir, corpus_env, "tracking=off", f"trainer.precision={name}", *args)
        out[name] = run_dir, results
    return out


def test_each_precision_trains_end_to_end_and_is_the_one_used(precisions):
    losses = {}
    for name, (run_dir, results) in precisions.items():
        assert (results["status"], results["steps"]) == ("finished", 3), name
        assert math.isfinite(results["dev_cer"]) and math.isfinite(results["test_cer"]), name
        model = load_checkpoint(list_checkpoints(run_dir)[-1])["model"]
        assert all(torch.isfinite(p).all() for p in model.values()), name
        losses[name] = logged(run_dir, "train/loss")[1]  # the same weights and batch
    # autocast really ran in the precision asked for: the same step's loss differs a little
    for name in ("bf16", "fp16"):
        assert losses[name] != losses["fp32"], name
        assert losses[name] == pytest.approx(losses["fp32"], rel=0.05), name


def test_fp16_scales_the_loss_and_the_others_do_not(precisions):
    scalers = {}
    for name, (run_dir, _) in precisions.items():
        scalers[name] = load_checkpoint(list_checkpoints(run_dir)[-1])["scaler"]
    assert scalers["fp32"] == scalers["bf16"] == {}  # GradScaler disabled
    run_dir, results = precisions["fp16"]
    # GradScaler starts at 2**16; a step whose scaled gradient overflows (here the first) is
    # skipped and halves the scale; the other steps update the weights. An overflow is not bad
    # data: it is counted apart from the non-finite steps and names no batch as bad
    norms = logged(run_dir, "train/grad_norm")
    overflows = sum(v is None for v in norms.values())
    assert overflows == results["fp16_overflows"] < 3
    assert results["nonfinite_steps"] == 0 and not list(run_dir.glob("nonfinite-rank*.jsonl"))
    assert "fp16_overflows" not in precisions["fp32"][1]
    assert scalers["fp16"]["scale"] == 2.0**16 * 0.5**overflows


# -- feature frames other than 10 ms -----------------------------------------------------------


def test_ctc_feasibility_follows_the_feature_hop(tmp_path):
    """An utterance is skipped as CTC-infeasible exactly when the model, with the configured
    hop, has fewer output frames than its transcript needs (when the CTC loss is infinite)."""
    path = tmp_path / "short.wav"  # 0.3 s: 31 frames of 10 ms (7 after 4x subsampling), 16 of 20 ms
    soundfile.write(path, 0.3 * np.sin(np.arange(4800) * 0.1).astype(np.float32), 16000)
    seven = Utterance("seven", str(path), "abcdefg", 0.3)  # 7 letters need 7 CTC frames
    two = Utterance("two", str(path), "ab", 0.3)
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"id": u.id, "audio": u.audio, "text": u.text}) + "\n"
                                for u in (seven, two)))  # fmt: skip
    wav = SpeechDataset([two])[0].wav
    for hop_ms, frames in ((10, 7), (20, 3)):
        cfg = compose_config([*SMALL, "data=manifest", f"data.manifest={manifest}",
                              f"features.hop_ms={hop_ms}"])  # fmt: skip
        model = SpeechRecognizer(cfg.model, cfg.features).eval()
        with torch.no_grad():
            log_probs, out_lens = model(wav[None], torch.tensor([len(wav)]))
        tokens = torch.tensor([encode(seven.text)])
        loss = F.ctc_loss(log_probs.transpose(0, 1), tokens, out_lens, torch.tensor([7]))
        assert out_lens.item() == frames
        item = SpeechDataset([seven], subsampling=4, hop_ms=hop_ms)[0]
        assert isinstance(item, Item) == math.isfinite(loss.item()) == (frames >= 7), hop_ms
        # the training loader of that config skips it and says why
        loader, _ = split_loader(cfg, "train", DistEnv(), train=True)
        skips, ids = SkipCounter(), []
        for batch in loader:
            skips.add(batch)
            ids += batch.ids
        if frames < 7:
            assert (dict(skips.counts), ids) == ({"ctc infeasible": 1}, ["two"])
        else:
            assert (skips.total, sorted(ids)) == (0, ["seven", "two"])


# -- a checkpoint whose replacement was killed ------------------------------------------------


def killed_while_replacing(run_dir: Path, renames: int) -> None:
    """Checkpoints 100 and 200, then a writer that replaces step 200 and is killed (SIGKILL)
    after `renames` renames: 1 = the old step-200 moved aside, 2 = the new one in its place
    without its marker. The writer is a forked child: a real process that dies at that point."""
    save_checkpoint(run_dir, 100, {"w": {"w": torch.zeros(3)}}, keep_last=5)
    save_checkpoint(run_dir, 200, {"w": {"w": torch.ones(3)}}, keep_last=5)
    new = {"w": {"w": torch.full((3,), 2.0)}}
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            done, real_rename = [], os.rename

            def rename(a, b):
                real_rename(a, b)
                done.append(b)
                if len(done) == renames:
                    os.kill(os.getpid(), signal.SIGKILL)

            os.rename = rename
            save_checkpoint(run_dir, 200, new, keep_last=5)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("renames", [1, 2], ids=["moved-aside", "replaced-unmarked"])
def test_a_checkpoint_whose_replacement_was_killed_is_restored_by_the_next_save(tmp_path, renames):
    killed_while_replacing(tmp_path, renames)
    root = tmp_path / "checkpoints"
    old = [p for p in root.iterdir() if p.name.startswith(".old-step-00000200-")]
    assert len(old) == 1 and (old[0] / "COMPLETE").is_file()
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-00000100"]
    # the next job resumes from step 100; its first save puts step 200 back, intact, and
    # keeps the last 2
    save_checkpoint(tmp_path, 150, {"w": {"w": torch.zeros(3)}}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000150", "step-00000200"]
    path, ckpt = load_latest(tmp_path)
    assert path.name == "step-00000200" and torch.equal(ckpt["w"]["w"], torch.ones(3))


# -- two ranks agreeing ------------------------------------------------------------------------


def two_rank_job(run_dir: Path, env: dict, overrides: list[str], sigterm_rank1_at: int = 0):
    """`launch` as 2 gloo ranks; with `sigterm_rank1_at`, rank 1 alone gets a SIGTERM once
    rank 0 has logged that step. Returns both ranks' output."""
    port, logs, procs = free_port(), [], []
    cmd = [sys.executable, "-m", "lmu_asr.launch", *SMALL, f"hydra.run.dir={run_dir}", *overrides]
    for rank in range(2):
        dist = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        dist |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(run_dir.parent / f"{run_dir.name}-rank{rank}.out")
        with open(logs[-1], "w") as out:
            procs.append(
                subprocess.Popen(cmd, env=env | dist, stdout=out, stderr=subprocess.STDOUT)
            )
    try:
        if sigterm_rank1_at:
            wait_for_step(run_dir, sigterm_rank1_at, procs[0])
            procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(outs)
    return outs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, corpus_env):  # noqa: F811
    """A 2-rank job whose training set has one utterance of corrupt float audio, finite samples of
    1e30 whose power overflows the features to inf (NaN samples are refused when read),
    stopped by a SIGTERM to rank 1 only, then resumed in this process (1 rank) to its end:
    (run dir, both ranks' outputs, the nonfinite-rank*.jsonl records and the train state of
    the stopped job, the results of the resumed one)."""
    folder = tmp_path_factory.mktemp("two_ranks")
    huge = folder / "huge.wav"
    soundfile.write(huge, np.full(24000, 1e30, np.float32), 16000, subtype="FLOAT")
    row = {"id": "huge-audio", "audio": str(huge), "text": "not a number"}
    args = write_manifests(folder, corpus_env, [row])  # last: not in the feature statistics
    args += ["trainer.stats_utts=16", "trainer.max_steps=12", "trainer.batches_per_step=2"]
    args += ["trainer.eval_every=100", "trainer.log_every=1", "checkpoint.every_steps=100"]
    args += ["tracking=off"]
    run_dir = folder / "run"
    outs = two_rank_job(run_dir, corpus_env, [*args, "trainer.final_lm=false"], sigterm_rank1_at=2)
    records = [read_jsonl(run_dir / f"nonfinite-rank{r}.jsonl") for r in range(2)]
    state = load_checkpoint(list_checkpoints(run_dir)[-1])["train_state"]
    assert not (run_dir / "results.json").exists()
    results = run(run_dir, corpus_env, *args)  # the same settings
    return run_dir, outs, records, state, results


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_step(two_ranks):
    run_dir, outs, _, state, results = two_ranks
    step = state["step"]
    assert 2 <= step < 12
    assert f"stop at step {step}: terminated" in outs[0]
    assert "run the same command again to resume" in outs[0]
    assert len(state["rank_positions"]) == 2  # both ranks took part in the save
    assert [(s["reason"], s["step"]) for s in results["stops"]] == [("terminated", step)]
    assert (results["status"], results["steps"]) == ("finished", 12)


def test_a_non_finite_step_on_one_rank_is_skipped_by_every_rank_and_recorded(two_ranks):
    run_dir, _, records, state, results = two_ranks
    steps = [[r["step"] for r in rank] for rank in records]
    assert steps[0] == steps[1] and steps[0], "both ranks skip the same steps"
    for step, r0, r1 in zip(steps[0], *records, strict=True):
        # the corrupt utterance was on one rank only; each rank names its own batch
        assert ("huge-audio" in r0["ids"]) != ("huge-audio" in r1["ids"]), step
        assert not math.isfinite(r0["loss"]) and not math.isfinite(r1["loss"]), step
    assert state["nonfinite_steps"] == len(steps[0])
    # the count goes on after the restart (rank 0 records every skipped step of both jobs)
    skipped = {r["step"] for r in read_jsonl(run_dir / "nonfinite-rank0.jsonl")}
    assert results["nonfinite_steps"] == len(skipped)
    # one step per line (log_every=1): the loss is null at the skipped steps only, not 0
    loss = logged(run_dir, "train/loss")
    assert {s - 1 for s, v in loss.items() if v is None} == skipped
    assert all(v is None or math.isfinite(v) and v > 0 for v in loss.values())
    model = load_checkpoint(list_checkpoints(run_dir)[-1])["model"]
    assert all(torch.isfinite(p).all() for p in model.values())
    assert math.isfinite(results["dev_cer"])
