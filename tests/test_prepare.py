"""`python -m lmu_asr.prepare gigaspeech`: shards from a local GigaSpeech copy with real audio."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile

from lmu_asr import prepare as prepare_module
from lmu_asr.prepare import main, prepare
from lmu_asr.text import gigaspeech_train_text
from tests.gigaspeech_source import write_gigaspeech_source

REPO = Path(__file__).resolve().parents[1]
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


@pytest.fixture(autouse=True)
def offline(hf_offline):  # conftest.py
    return hf_offline


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_gigaspeech_source(tmp_path_factory.mktemp("gigaspeech"), 60, 25, 25)


def expected_split(source: Path, split: str) -> tuple[list[tuple], Counter, int]:
    """Kept utterances (id, audio bytes, text, duration) in source order, drops by reason, and
    the number of source rows, read from the parquet files straight."""
    files = sorted(source.glob(f"{HUB_SPLITS[split]}-*.parquet"))
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    kept, dropped = [], Counter()
    for row in rows:
        text = gigaspeech_train_text(row["text"])
        audio = row["audio"]["bytes"] or (
            Path(row["audio"]["path"]).read_bytes() if row["audio"]["path"] else None
        )
        reason = "garbage tags" if text is None else "empty transcript" if not text else None
        reason = reason or ("unreadable audio" if audio is None else None)
        if reason:
            dropped[reason] += 1
            continue
        begin, end = row["begin_time"], row["end_time"]
        duration = end - begin if begin is not None else soundfile.info(io.BytesIO(audio)).duration
        kept.append((row["segment_id"], audio, text, duration))
    return kept, dropped, len(rows)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_prepared(out: Path, source: Path, shard_mb: float, rows_per_group: int) -> None:
    """Everything prepared.json, the shards and the index say, against the source."""
    manifest = json.loads((out / "prepared.json").read_text())
    assert manifest["splits"].keys() == {"train", "dev", "test"}
    largest_group = 0
    for split, info in manifest["splits"].items():
        kept, dropped, n_rows = expected_split(source, split)
        assert (info["utterances"], info["dropped"], info["source_rows"]) == (
            len(kept),
            dict(dropped),
            n_rows,
        )
        assert dropped.keys() == {"garbage tags", "empty transcript", "unreadable audio"}
        position = {utt[0]: i for i, utt in enumerate(kept)}
        by_id = {utt[0]: utt for utt in kept}
        seen, index_rows = [], []
        for number, shard in enumerate(info["shards"]):
            path = out / shard["file"]
            assert shard["file"] == f"{split}/shard-{number:05d}.parquet"
            assert (shard["bytes"], shard["sha256"]) == (path.stat().st_size, sha256(path))
            parquet = pq.ParquetFile(path)
            assert parquet.schema_arrow.names == ["id", "audio", "text", "duration"]
            assert [str(t) for t in parquet.schema_arrow.types] == [
                "string",
                "binary",
                "string",
                "double",
            ]
            groups = [parquet.metadata.row_group(g) for g in range(parquet.num_row_groups)]
            assert all(g.num_rows == rows_per_group for g in groups[:-1])
            assert 0 < groups[-1].num_rows <= rows_per_group
            assert groups[0].column(1).compression == "UNCOMPRESSED"
            rows = parquet.read().to_pylist()
            assert len(rows) == shard["utterances"]
            for row in rows:  # audio bytes as in the source, text by the rules, duration
                assert (row["id"], row["audio"], row["text"]) == by_id[row["id"]][:3]
                assert row["duration"] == pytest.approx(by_id[row["id"]][3], abs=1e-9)
            keys = [(row["duration"], row["id"]) for row in rows]
            assert keys == sorted(keys)
            assert shard["hours"] == pytest.approx(sum(r["duration"] for r in rows) / 3600)
            # a shard is the next kept source rows, closed once its audio reaches shard_mb
            positions = sorted(position[row["id"]] for row in rows)
            assert positions == list(range(len(seen), len(seen) + len(rows)))
            audio_bytes = [len(row["audio"]) for row in rows]
            assert sum(audio_bytes) < shard_mb * 1e6 + max(audio_bytes)
            if number < len(info["shards"]) - 1:
                assert sum(audio_bytes) >= shard_mb * 1e6
            for g in range(0, len(rows), rows_per_group):
                largest_group = max(largest_group, sum(audio_bytes[g : g + rows_per_group]))
            seen += [row["id"] for row in rows]
            index_rows += [
                {"id": r["id"], "duration": r["duration"], "shard": number, "row": i}
                | {"text": r["text"]}
                for i, r in enumerate(rows)
            ]
        assert sorted(seen) == sorted(by_id)  # each kept utterance exactly once
        assert info["hours"] == pytest.approx(sum(utt[3] for utt in kept) / 3600)
        index = pq.read_table(out / split / "index.parquet")
        assert index.schema.names == ["id", "duration", "shard", "row", "text"]
        assert [str(t) for t in index.schema.types][2:4] == ["int32", "int32"]
        assert index.to_pylist() == index_rows
    assert manifest["max_group_bytes"] == largest_group
    options = {"format": 1, "dataset": "gigaspeech", "subset": "xs", "source": str(source)}
    options |= {"text_rules": "gigaspeech", "shard_mb": shard_mb, "rows_per_group": rows_per_group}
    assert {k: manifest[k] for k in options} == options
    assert manifest.keys() == {*options, "max_group_bytes", "splits", "seconds"}


def test_prepare_local_parquet_source(source, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare("xs", out, str(source), shard_mb=0.3, rows_per_group=4)
    assert manifest == json.loads((out / "prepared.json").read_text())
    check_prepared(out, source, 0.3, 4)
    assert len(manifest["splits"]["train"]["shards"]) >= 5
    assert not list(out.rglob("*.tmp"))


def without_seconds(path: Path) -> dict:
    manifest = json.loads(path.read_text())
    del manifest["seconds"]
    return manifest


def assert_same_output(a: Path, b: Path) -> None:
    """Shards and indexes byte-identical; prepared.json equal but for the time taken."""
    for split in ("train", "dev", "test"):
        names = sorted(p.name for p in (b / split).glob("*.parquet"))
        assert sorted(p.name for p in (a / split).glob("*.parquet")) == names
        for name in names:
            assert (a / split / name).read_bytes() == (b / split / name).read_bytes(), name
    assert without_seconds(a / "prepared.json") == without_seconds(b / "prepared.json")


@pytest.mark.slow
def test_killed_prepare_resumes_to_the_same_files(tmp_path):
    source = write_gigaspeech_source(tmp_path / "source", 160, 30, 30, seed=1)
    env = os.environ | {"PYTHONPATH": str(REPO)}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "lmu_asr.prepare", "gigaspeech", "--subset", "xs"] + [
            *("--from", str(source), "--out", str(out), "--shard-mb", "0.25"),
        ]

    a, b = tmp_path / "a", tmp_path / "b"
    run = subprocess.Popen(command(a), env=env, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (a / "train" / "shard-00000.parquet").exists():
        assert run.poll() is None, run.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    run.send_signal(signal.SIGKILL)
    run.wait()
    run.stderr.close()
    assert not (a / "prepared.json").exists(), "finished before the kill: make the source larger"
    progress = a / "train" / "progress.json"
    done = len(json.loads(progress.read_text())["shards"]) if progress.exists() else 0
    # what a kill leaves at worst: a half-written .tmp, a shard written but not in progress.json
    for leftover in (f"shard-{done:05d}.parquet.tmp", f"shard-{done:05d}.parquet"):
        if not (a / "train" / leftover).exists():
            (a / "train" / leftover).write_bytes(b"half a shard")
    subprocess.run(command(a), env=env, cwd=REPO, check=True, capture_output=True)
    prepare("xs", b, str(source), shard_mb=0.25)  # in one go
    assert len(json.loads((b / "prepared.json").read_text())["splits"]["train"]["shards"]) >= 5
    assert_same_output(a, b)
    assert not list(a.rglob("*.tmp"))


def test_other_options_refused_complete_is_noop_and_verify(source, tmp_path, capsys):
    out = tmp_path / "prepared"
    args = ["gigaspeech", "--subset", "xs", "--from", str(source), "--out", str(out)]
    assert main([*args, "--splits", "dev,test", "--shard-mb", "0.3"]) == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert main([*args, "--splits", "dev", "--shard-mb", "0.3"]) == 0  # complete: a no-op
    assert "complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps

    assert main([*args, "--shard-mb", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other options" in err and "shard_mb 0.3 there, 0.5 now" in err
    assert "use another --out" in err and str(out) in err
    with pytest.raises(ValueError, match="rows_per_group 32 there, 8 now"):
        prepare("xs", out, str(source), ("dev",), shard_mb=0.3, rows_per_group=8)
    (out / "prepared.json").unlink()  # now an unfinished prepare: progress.json decides
    with pytest.raises(ValueError, match=r"dev/progress.json was made with other options"):
        prepare("s", out, str(source), ("dev",), shard_mb=0.3)
    with pytest.raises(ValueError, match="source"):
        prepare("xs", out, str(tmp_path), ("dev",), shard_mb=0.3)

    manifest = prepare("xs", out, str(source), ("dev", "test"), shard_mb=0.3)
    assert main(["verify", str(out)]) == 0
    shard = out / manifest["splits"]["test"]["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(shard) in err and "sha256" in err
    assert err.count("\n") == 1  # the other shards are sound


def test_more_splits_later_are_added(source, tmp_path):
    out, one_go = tmp_path / "later", tmp_path / "one-go"
    prepare("xs", out, str(source), ("dev",), shard_mb=0.3)
    assert json.loads((out / "prepared.json").read_text())["splits"].keys() == {"dev"}
    prepare("xs", out, str(source), ("test", "train"), shard_mb=0.3)
    prepare("xs", one_go, str(source), shard_mb=0.3)
    assert_same_output(out, one_go)


def test_save_to_disk_source_and_resume_after_kill(tmp_path, hf_offline, monkeypatch):
    # small: save_to_disk cannot hold a row without audio, and this source has none
    source = write_gigaspeech_source(tmp_path / "source", 20, 8, 8, seed=2)
    datasets = hf_offline
    disk = tmp_path / "disk"
    datasets.DatasetDict(
        {
            name: datasets.Dataset.from_parquet(
                sorted(str(p) for p in source.glob(f"{name}-*.parquet"))
            )
            for name in ("train", "validation", "test")
        }
    ).save_to_disk(str(disk))
    from_parquet = tmp_path / "from-parquet"
    prepare("xs", from_parquet, str(source), shard_mb=0.1)

    # killed between a shard's move to its name and the progress.json that lists it
    out, real_write_json, writes = tmp_path / "from-disk", prepare_module._write_json, []

    def dies_on_the_fourth_write(path, obj):
        writes.append(path)
        if len(writes) == 4:
            raise KeyboardInterrupt
        real_write_json(path, obj)

    monkeypatch.setattr(prepare_module, "_write_json", dies_on_the_fourth_write)
    with pytest.raises(KeyboardInterrupt):
        prepare("xs", out, str(disk), shard_mb=0.1)
    monkeypatch.undo()
    train = json.loads((out / "train" / "progress.json").read_text())
    assert len(train["shards"]) == 3 and (out / "train" / "shard-00003.parquet").exists()
    manifest = prepare("xs", out, str(disk), shard_mb=0.1)
    assert manifest["source"] == str(disk) and len(manifest["splits"]["train"]["shards"]) > 4
    (out / "prepared.json").write_text(
        (out / "prepared.json").read_text().replace(str(disk), str(source))
    )
    assert_same_output(out, from_parquet)


def test_source_without_text_column(source, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in source.glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["text"]), broken / path.name)
    with pytest.raises(ValueError, match=r"broken split 'train': no column 'text'"):
        prepare("xs", tmp_path / "out", str(broken))


def test_hub_unreachable_names_token_and_from(tmp_path):
    with pytest.raises(RuntimeError, match="speechcolab/gigaspeech") as error:
        prepare("xs", tmp_path / "out", splits=("dev",))
    assert "HF_TOKEN" in str(error.value) and "--from" in str(error.value)
