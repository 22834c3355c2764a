"""Evaluation never scores over missing data: every utterance of the scored set is scored or
counted as skipped (by reason, first ones named), a skip fails `evaluate` unless allow_skips=true,
nothing scored always fails, and the table names what was scored. The end-of-training evaluation
counts skips without failing the finished run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from lmu_asr import evaluate
from lmu_asr.checkpoint import model_config, save_checkpoint
from lmu_asr.distributed import DistEnv
from lmu_asr.evaluate import final_evaluation, run_cli
from lmu_asr.launch import compose_config
from lmu_asr.model import SpeechRecognizer
from lmu_asr.state import TrainState
from lmu_asr.tracking import Tracker

TINY = ["model=lmu_tiny", "data.num_workers=0", "trainer.threads=1", "tracking=off"]


def make_checkpoint(run_dir: Path) -> tuple[SpeechRecognizer, Path]:
    """An untrained lmu_tiny model saved as step 1 of `run_dir` (what evaluate and transcribe
    load); its hypotheses are noise, which is all these tests need."""
    cfg = compose_config(TINY)
    torch.manual_seed(0)
    model = SpeechRecognizer(cfg.model, cfg.features, cfg.data.sample_rate)
    items = {"model": model, "train_state": TrainState(), "config": model_config(cfg)}
    return model, save_checkpoint(run_dir, 1, items, keep_last=2)


def write_wav(path: Path, seconds: float = 1.0) -> Path:
    rng = np.random.default_rng(0)
    soundfile.write(
        path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype("float32"), 16000
    )
    return path


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """run/ (a checkpoint), a.wav and b.wav, mixed.jsonl: a, b and 2 missing files."""
    root = tmp_path_factory.mktemp("eval")
    make_checkpoint(root / "run")
    write_wav(root / "a.wav"), write_wav(root / "b.wav", 1.5)
    rows = [
        {"id": "a", "audio": "a.wav", "text": "one"},
        {"id": "b", "audio": "b.wav", "text": "two"},
    ]
    rows += [{"id": f"gone{i}", "audio": f"gone{i}.wav", "text": "three"} for i in range(2)]
    write_manifest(root / "mixed.jsonl", rows)
    return root


def cli(argv: list[str], capsys) -> tuple[int | str | None, str, str]:
    """evaluate's command line in this process: (exit code or message, stdout, stderr)."""
    try:
        run_cli(lambda: evaluate.main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def args(workdir: Path, manifest: str, *more: str) -> list[str]:
    return [f"checkpoint={workdir / 'run'}", "data=manifest", "data.num_workers=0",
            f"data.manifest={workdir / manifest}", *more]  # fmt: skip


def test_skips_fail_the_evaluation_with_a_count_per_reason_and_write_no_report(workdir, capsys):
    report = workdir / "default.json"
    report.write_text("an earlier report")
    code, out, _ = cli(args(workdir, "mixed.jsonl", f"report={report}"), capsys)
    assert code == (
        f"error: {workdir / 'mixed.jsonl'}: 2 of 4 utterances not scored: unreadable audio 2 "
        f"(first: gone0 ({workdir / 'gone0.wav'}), gone1 ({workdir / 'gone1.wav'})); fix or "
        "remove them, or pass allow_skips=true to score the rest"
    )
    assert "WER" not in out  # no number over an incomplete set
    assert report.read_text() == "an earlier report"  # untouched


def test_allow_skips_scores_the_rest_and_shows_the_skips(workdir, capsys):
    report = workdir / "allowed.json"
    code, out, _ = cli(args(workdir, "mixed.jsonl", "allow_skips=true", f"report={report}"), capsys)
    assert code == 0
    table = out.split("report:")[0].splitlines()
    name = str(workdir / "mixed.jsonl")
    assert table[0].split() == ["scored", "utts", "skipped", "words", "WER", "CER"]
    assert table[1].split()[:4] == [name, "2", "2", "2"]  # the manifest, not "train"
    assert table[2].startswith(f"{name}: 2 of 4 utterances not scored: unreadable audio 2")
    data = json.loads(report.read_text())
    assert data["scored"] == name
    totals = data["totals"]
    assert (totals["utterances"], totals["skipped"]) == (2, 2)
    assert totals["skipped_by_reason"] == {"unreadable audio": 2}
    assert {u["id"] for u in data["utterances"]} == {"a", "b"}
    assert totals["skipped_utterances"] == [
        {"id": f"gone{i}", "reason": "unreadable audio", "audio": str(workdir / f"gone{i}.wav")}
        for i in range(2)
    ]


def test_nothing_scored_is_an_error_even_with_allow_skips(workdir, capsys):
    rows = [{"audio": f"x{i}.wav", "text": "hi"} for i in range(10)]
    write_manifest(workdir / "wrong.jsonl", rows)
    code, out, _ = cli(args(workdir, "wrong.jsonl", "allow_skips=true"), capsys)
    assert isinstance(code, str) and code.startswith(
        f"error: {workdir / 'wrong.jsonl'}: nothing to score, 10 of 10 utterances not scored: "
        "unreadable audio 10 (first: x0.wav"
    )
    assert code.endswith(", ...)") and "0.00%" not in out
    (workdir / "empty.jsonl").write_text("\n")
    code, _, _ = cli(args(workdir, "empty.jsonl", "allow_skips=true"), capsys)
    assert code == f"error: {workdir / 'empty.jsonl'}: nothing to score, it holds no utterance"


def test_a_repeated_id_is_accounted_for_not_silently_merged(workdir, capsys):
    rows = [
        {"id": "same", "audio": "a.wav", "text": "one"},
        {"id": "same", "audio": "b.wav", "text": "two"},
    ]
    write_manifest(workdir / "dup.jsonl", rows)
    code, _, _ = cli(args(workdir, "dup.jsonl"), capsys)
    assert "1 of 2 utterances not scored: duplicate id 1" in code


def test_final_evaluation_counts_a_bad_dev_file_and_finishes(workdir, tmp_path):
    """The end of training: one missing dev file does not fail the finished run; the count is in
    results, the warning and evaluation.txt. A split with nothing scored gets null WER/CER."""
    dev = write_manifest(
        tmp_path / "dev.jsonl",
        [{"id": "a", "audio": str(workdir / "a.wav"), "text": "one"},
         {"id": "lost", "audio": str(workdir / "lost.wav"), "text": "two"}],
    )  # fmt: skip
    test = write_manifest(
        tmp_path / "test.jsonl", [{"audio": str(tmp_path / "x.wav"), "text": "a"}]
    )
    cfg = compose_config(
        [*TINY, "data=manifest", f"data.manifest={dev}", f"data.dev_manifest={dev}"]
        + [f"data.test_manifest={test}", "trainer.final_lm=false"]
    )
    model, _ = make_checkpoint(tmp_path / "unused")
    env = DistEnv(rank=0, local_rank=0, world_size=1)
    state = TrainState()
    with Tracker(cfg.tracking, tmp_path, 0, {}, None, 1) as tracker:
        results = final_evaluation(cfg, tmp_path, model, env, state, tracker, [])
    assert results["dev_skipped"] == 1 and isinstance(results["dev_wer"], float)
    assert results["test_skipped"] == 1 and results["test_wer"] is results["test_cer"] is None
    table = (tmp_path / "evaluation.txt").read_text().splitlines()
    assert table[1].split()[:3] == ["dev", "greedy", "1"] and table[1].split()[3] == "1"
    assert table[2].split()[1:] == ["greedy", "0", "1", "0", "-", "-"]
    assert "dev greedy: 1 of 2 utterances not scored: unreadable audio 1 (first: lost" in table[3]
    json.dumps(results, allow_nan=False)  # results.json stays valid JSON


def test_the_command_exits_non_zero_with_one_line_on_a_manifest_of_wrong_paths(workdir):
    """The issue's case, as a user runs it: no table, no 0.00 %, no traceback."""
    rows = [{"audio": f"x{i}.wav", "text": "hi"} for i in range(10)]
    write_manifest(workdir / "wrong10.jsonl", rows)
    cmd = [sys.executable, "-m", "lmu_asr.evaluate", *args(workdir, "wrong10.jsonl")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "WER" not in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {workdir / 'wrong10.jsonl'}: nothing to score, 10 of 10")
    assert "Traceback" not in out.stderr


@pytest.mark.corpus
def test_final_evaluation_scores_the_unseen_voices_of_the_demo_corpus(tmp_path):
    """With the demo corpus, the final evaluation also scores its unseen-voices split: keys in
    results (greedy and with the LM), a row in evaluation.txt, final/ metrics in the tracker."""
    cfg = compose_config(
        [*TINY, "data.corpus_train=4", "data.corpus_dev=2", "data.corpus_test=2"]
        + ["data.corpus_unseen=3", f"data.cache_dir={tmp_path / 'cache'}"]
    )
    model, _ = make_checkpoint(tmp_path / "unused")
    env = DistEnv(rank=0, local_rank=0, world_size=1)
    with Tracker(cfg.tracking, tmp_path, 0, {}, None, 1) as tracker:
        results = final_evaluation(cfg, tmp_path, model, env, TrainState(), tracker, ["a b c"])
    for key in ("unseen_cer", "unseen_wer", "unseen_cer_lm", "unseen_wer_lm"):
        assert isinstance(results[key], float), key
    assert results["unseen_skipped"] == 0
    rows = [line.split() for line in (tmp_path / "evaluation.txt").read_text().splitlines()]
    assert [r[:3] for r in rows[-2:]] == [["unseen", "greedy", "3"], ["unseen", "lm", "3"]]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("final/unseen_wer_lm" in m for m in logged)
    cfg.data.corpus_unseen = 0  # none: dev and test only
    with Tracker(cfg.tracking, tmp_path / "none", 0, {}, None, 1) as tracker:
        results = final_evaluation(cfg, tmp_path, model, env, TrainState(), tracker, ["a b c"])
    assert "unseen_wer" not in results and "dev_wer" in results
