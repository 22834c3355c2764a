"""`python -m lmu_asr.bench`: every group runs on a tiny configuration and prints one valid record
per measurement, the Markdown tables are made from those records, and the bars are judged on the
medians. (The numbers themselves are the benchmark's business, not the suite's.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmu_asr.bench.__main__ import main, markdown
from lmu_asr.bench.measure import Measurement

FIELDS = {"group", "name", "config", "median", "min", "max", "repeats", "unit", "command"}

TINY = {
    "lmu": ["--T", "64", "--batch", "2", "--hidden", "32", "--order", "8", "--repeats", "2",
            "--long-repeats", "1"],
    "train": ["--models", "lmu_tiny", "--batch-seconds", "4", "--utt-seconds", "2",
              "--repeats", "2", "--peak-n", "256"],
    "decode": ["--model", "lmu_tiny", "--utts", "2", "--utt-seconds", "1", "--repeats", "2",
               "--frames", "8", "--stream-models", "lmu_tiny", "--beam-size", "4"],
    "checkpoint": ["--model", "lmu_tiny", "--repeats", "2"],
    "data": ["--batch", "2", "--seconds", "1", "--repeats", "2", "--num-files", "6",
             "--workers", "0", "--epochs", "1"],
}  # fmt: skip


@pytest.mark.parametrize("group", sorted(TINY))
def test_each_group_prints_one_record_per_measurement(group, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoint writes to the current folder, then cleans up
    saved = tmp_path / "bench.jsonl"
    main([group, *TINY[group], "--threads", "1", "--save", str(saved)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed and printed == [json.loads(line) for line in saved.read_text().splitlines()]
    for r in printed:
        assert r.keys() >= FIELDS and r["group"] == group, r
        assert r["min"] <= r["median"] <= r["max"] and r["repeats"] >= 1, r
        assert r["command"].startswith(f"python -m lmu_asr.bench {group} ")
        if "ratio" in r:
            assert r["ratio"] > 0 and r["ratio_is"] and r["baseline"], r
        if "bar" in r:  # judged on the median (of the ratio where there is one)
            op, limit = r["bar"].split()
            value = r.get("ratio", r["median"])
            assert r["met"] == (value >= float(limit) if op == ">=" else value <= float(limit)), r
    assert list(tmp_path.iterdir()) == [saved]  # no checkpoint or wav left behind
    names = {r["name"] for r in printed}
    expected = {
        "lmu": {"lmu_fft", "lmu_recurrent", "lstm", "transformer_layer", "memory_sequential"},
        "train": {"train_step.lmu_tiny", "train_flops.lmu_tiny", "matmul_peak.lmu_tiny"},
        "decode": {"rtf.encoder", "rtf.greedy", "rtf.beam4", "lmu_step.lmu_tiny"},
        "checkpoint": {"checkpoint_save", "checkpoint_load"},
        "data": {"logmel", "loader", "loader_per_worker", "loader_peak_pss"},
    }[group]
    assert expected <= names


def test_loader_from_prepared_shards(capsys):
    """`--files prepared`: the generated files made into a GigaSpeech-schema source, prepared
    into shards and read back the way `data=prepared` reads them: the same audio as the files."""
    runs = {}
    for files in ("generated", "prepared"):
        main(["data", *TINY["data"], "--files", files, "--threads", "1"])
        runs[files] = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    loader = runs["prepared"]["loader"]
    assert loader["config"]["files"] == "6 wav generated at 16000 Hz, prepared"
    assert loader["config"]["audio_hours"] == runs["generated"]["loader"]["config"]["audio_hours"]
    assert loader["median"] > 0 and runs["prepared"]["loader_peak_pss"]["median"] > 100  # MiB
    assert runs["prepared"]["prepare"]["median"] > 0 and "prepare" not in runs["generated"]


def test_train_flops_are_counted_and_compared_with_the_peak(capsys):
    main(["train", *TINY["train"], "--threads", "1"])
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    flops = rows["train_flops.lmu_tiny"]
    assert flops["config"]["flops_per_step"] > 0
    assert flops["baseline"] == "matmul_peak.lmu_tiny"
    peak = rows["matmul_peak.lmu_tiny"]["median"]
    assert flops["ratio"] == pytest.approx(flops["median"] / peak, rel=1e-2)
    assert "aten::" in rows["profile.lmu_tiny"]["note"]  # the top operators are named


def test_markdown_tables_from_saved_records(tmp_path):
    records = [
        Measurement("a", "s", [0.002, 0.003], {"T": 1, "batch": 4}).record("lmu"),
        Measurement("b", "s", [0.02], {"T": 1, "batch": 4}, baseline="a", ratio=8.0,
                    ratio_is="b time / a time", bar=">= 5", met=True).record("lmu"),
    ]  # fmt: skip
    for r in records:
        r |= {"command": "python -m lmu_asr.bench lmu --T 1", "machine": "test machine"}
    text = markdown(records)
    assert "`python -m lmu_asr.bench lmu --T 1`" in text
    assert "Common: T=1, batch=4." in text
    assert "| a |  | 2.5 ms | 2 ms – 3 ms |  |  |" in text
    assert "| b |  | 20 ms | 20 ms – 20 ms | 8 | >= 5: met |" in text
    assert "- b: ratio = b time / a time" in text
    saved = tmp_path / "r.jsonl"
    saved.write_text("".join(json.dumps(r) + "\n" for r in records))
    cli = [sys.executable, "-m", "lmu_asr.bench", "markdown", str(saved)]
    assert (
        subprocess.run(cli, capture_output=True, text=True, check=True).stdout.strip()
        == text.strip()
    )


@pytest.mark.slurm
@pytest.mark.slow
def test_orchestration_on_the_cluster(slurm_cluster, capsys, monkeypatch):
    """launch -m of a 2-job sweep, sbatch to the first step, requeue to the resumed step: once
    each on the session's cluster (the bench's own cluster start is what `dev-cluster.sh up`
    does for every SLURM test)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    main(["orchestration", "--repeats", "1", "--jobs", "2"])
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"launch_m_returns", "sbatch_to_first_step", "requeue_to_resumed_step"}
    for r in rows.values():
        assert 0 < r["median"] < 120, r
    assert rows["launch_m_returns"]["config"]["jobs"] == 2
    assert slurm_cluster.run("squeue", "-h").stdout.strip() == ""  # the bench cancelled its jobs
