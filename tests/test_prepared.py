"""Training from prepared shards (`data=prepared`): every rank reads its own disjoint block of
each epoch, equal in batches; a run stopped mid-epoch resumes on the same batches; a process's
memory is bounded by its row-group cache, not by the split."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lmu_asr.checkpoint import list_checkpoints
from lmu_asr.data import BucketBatchSampler, SpeechDataset, make_loader, num_frames
from lmu_asr.prepare import prepare
from lmu_asr.prepared import PreparedSplit
from tests.gigaspeech_source import write_gigaspeech_source
from tests.test_ddp import free_port
from tests.test_train import assert_bitwise_equal, logged_values, tensors, wait_for_step

ROWS_PER_GROUP = 4


def audio_bytes(folder: Path) -> int:
    return sum(
        sum(len(b or b"") for b in pq.read_table(f, columns=["audio"])["audio"].to_pylist())
        for f in sorted(folder.glob("*/shard-*.parquet"))
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A GigaSpeech-schema source with real audio, prepared into about 8 train shards."""
    root = tmp_path_factory.mktemp("prepared")
    source = write_gigaspeech_source(root / "source", n_train=160, n_dev=12, n_test=12)
    probe = prepare("xs", root / "probe", source=str(source), splits=("train",))
    shard_mb = audio_bytes(root / "probe") / 8 / 2**20
    assert probe["splits"]["train"]["utterances"] > 100
    out = root / "out"
    prepare("xs", out, source=str(source), shard_mb=shard_mb, rows_per_group=ROWS_PER_GROUP)
    return out


def rank_batches(utts: PreparedSplit, epoch: int, rank: int, world: int, skip: int = 0):
    frames = [num_frames(d) for d in utts.durations]
    sampler = BucketBatchSampler(frames, 800, seed=3, rank=rank, world_size=world,
                                 shards=utts.shards)  # fmt: skip
    sampler.set_epoch(epoch, skip)
    return sampler, list(sampler)


def test_two_ranks_read_disjoint_complete_halves_of_every_epoch(prepared):
    utts = PreparedSplit(prepared, "train")
    assert len(set(utts.shards.tolist())) >= 6
    orders = []
    for epoch in (0, 1):
        halves = [rank_batches(utts, epoch, rank, 2)[1] for rank in (0, 1)]
        assert len(halves[0]) == len(halves[1]) > 4
        for batch in halves[0] + halves[1]:  # a batch never mixes shards
            assert len({int(utts.shards[i]) for i in batch}) == 1
        rows = [[i for b in half for i in b] for half in halves]
        assert set(rows[0]) | set(rows[1]) == set(range(len(utts)))  # complete
        padded = (len(halves[0]) * 2) - len({tuple(b) for half in halves for b in half})
        assert padded <= 1  # an odd number of batches: the first one is read again at the end
        overlap = set(rows[0]) & set(rows[1])
        assert overlap == (set(halves[0][0]) if padded else set())  # disjoint
        assert sum(map(len, rows)) == len(utts) + len(overlap)
        shards = [{int(utts.shards[i]) for i in r} for r in rows]
        assert len(shards[0] & shards[1]) <= 1 + padded  # the block boundary's shard, and pad
        orders.append(halves)
    assert orders[0] != orders[1]  # each epoch shuffles shards and batches anew

    one = rank_batches(utts, 0, 0, 1)[1]  # one rank alone reads the whole epoch once
    assert sorted(i for b in one for i in b) == list(range(len(utts)))


def test_each_rank_loads_only_its_rows_with_few_row_group_reads(prepared):
    """Through the real dataset and loader: the ids each rank decodes are its own block's, the
    two make the split, and a rank reads about its own share of the row groups, each once."""
    every = {u.id for u in PreparedSplit(prepared, "train")}
    seen, reads = [], []
    for rank in (0, 1):
        utts = PreparedSplit(prepared, "train", cache_groups=4)
        sampler, batches = rank_batches(utts, 0, rank, 2)
        mine = {
            (int(utts.shards[i]), int(utts.rows[i]) // ROWS_PER_GROUP) for b in batches for i in b
        }
        ids = set()
        for batch in make_loader(SpeechDataset(utts, max_duration=8.0), sampler, num_workers=0):
            ids |= set(batch.ids) | {utt_id for utt_id, _ in batch.skipped}
        seen.append(ids)
        reads.append((utts.groups_read, len(mine)))
        assert len(mine) <= utts.groups_read <= 1.5 * len(mine), reads
    assert seen[0] | seen[1] == every
    assert len(seen[0] & seen[1]) <= max(map(len, batches))  # at most the padding batch
    groups = sum(-(-n // ROWS_PER_GROUP) for n in pq.read_table(
        prepared / "train" / "index.parquet", columns=["shard"]
    )["shard"].value_counts().field("counts").to_pylist())  # fmt: skip
    assert reads[0][0] + reads[1][0] <= 1.5 * groups


def test_mid_epoch_skip_continues_with_the_same_batches(prepared):
    utts = PreparedSplit(prepared, "train")
    _, full = rank_batches(utts, 1, 1, 2)
    sampler, rest = rank_batches(utts, 1, 1, 2, skip=3)
    assert rest == full[3:]
    again = BucketBatchSampler([num_frames(d) for d in utts.durations], 800, rank=1, world_size=2,
                               shards=utts.shards)  # fmt: skip
    again.load_state_dict(sampler.state_dict())
    assert list(again) == full[3:]


def test_unfinished_or_damaged_prepared_folders_are_named(prepared, tmp_path):
    (tmp_path / "half" / "train").mkdir(parents=True)
    (tmp_path / "half" / "train" / "progress.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"half: no prepared.json \(the prepare was not"):
        PreparedSplit(tmp_path / "half", "train")
    with pytest.raises(ValueError, match=r"no split 'other'"):
        PreparedSplit(prepared, "other")
    utts = PreparedSplit(prepared, "dev")
    first = utts[0]
    shard = utts.shard_path(int(utts.shards[0]))
    moved = shard.with_suffix(".moved")
    shard.rename(moved)
    try:
        fresh = PreparedSplit(prepared, "dev")
        item = SpeechDataset(fresh)[0]
        assert item.reason == "unreadable audio"
        with pytest.raises(ValueError, match=rf"{shard.name} is missing"):
            SpeechDataset(PreparedSplit(prepared, "dev"), strict=True)[0]
    finally:
        moved.rename(shard)
    assert SpeechDataset(PreparedSplit(prepared, "dev"))[0].id == first.id


RSS_SCRIPT = """
import ctypes, json, sys, psutil
from lmu_asr.data import BucketBatchSampler, SpeechDataset, make_loader, num_frames
from lmu_asr.prepared import PreparedSplit
utts = PreparedSplit(sys.argv[1], "train", cache_groups=int(sys.argv[2]))
frames = [num_frames(d) for d in utts.durations]
sampler = BucketBatchSampler(frames, 2100, shards=utts.shards)
rss, audio_s = [[], []], 0.0
for epoch in (0, 1):
    sampler.set_epoch(epoch)
    for batch in make_loader(SpeechDataset(utts), sampler, num_workers=0):
        audio_s += batch.wav_lens.sum().item() / 16000
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # count live memory, not the allocator's free pools
        rss[epoch].append(psutil.Process().memory_info().rss)
print(json.dumps({"rss": rss, "audio_s": audio_s}))
"""


@pytest.mark.slow
def test_memory_is_bounded_by_the_cache_not_by_the_split(tmp_path):
    """Two epochs over a prepared split of 200 MB of audio, read by one process whose cache holds
    4 row groups of 8 rows (0.5 MB each): its RSS rises by less than 40 MB over the first batches
    (measured: 13 to 22 MB: the cache, decoded batches, the allocator's pools) and by less than a
    sixteenth of the split in the second (measured: 0.1 to 4.9 MB; CI once saw 4.9 MB without
    malloc_trim, so live memory is read after trimming). Holding the split shows as 200 MB in the
    first epoch; holding a share of each batch read grows again by that share in the second."""
    import numpy as np
    import pyarrow as pa
    import soundfile

    rng = np.random.default_rng(0)
    rows = {"segment_id": [], "text": [], "audio": [], "begin_time": [], "end_time": []}
    noise = [0.1 * rng.standard_normal(32000) for _ in range(16)]
    for i in range(3200):  # 2 s of 16-bit noise each: 64 kB, 200 MB in all
        buffer = io.BytesIO()
        soundfile.write(buffer, noise[i % 16], 16000, format="WAV", subtype="PCM_16")
        rows["segment_id"].append(f"utt{i:05d}")
        rows["text"].append("A SHORT TEST SENTENCE <PERIOD>")
        rows["audio"].append({"bytes": buffer.getvalue(), "path": f"utt{i:05d}.wav"})
        rows["begin_time"].append(0.0)
        rows["end_time"].append(2.0)
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "src" / "train-00000-of-00001.parquet")
    info = prepare("xs", tmp_path / "out", source=str(tmp_path / "src"), splits=("train",),
                   shard_mb=16, rows_per_group=8)  # fmt: skip
    split_bytes = sum(s["bytes"] for s in info["splits"]["train"]["shards"])
    buffer_bytes = 4 * info["max_group_bytes"]
    assert split_bytes >= 100 * buffer_bytes

    cmd = [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "out"), "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["audio_s"] == pytest.approx(2 * 6400.0)  # every utterance read, twice
    first, second = out["rss"]
    warm, peak1, peak2 = first[2], max(first), max(second)
    mib = {"warm": warm, "growth": peak1 - warm, "again": peak2 - peak1, "split": split_bytes}
    print("RSS after 3 batches {warm:.0f} MiB, then +{growth:.1f} MiB over the first epoch of "
          "{split:.0f} MiB of audio, {again:+.1f} MiB in the second".format(
              **{k: v / 2**20 for k, v in mib.items()}))  # fmt: skip
    assert peak1 - warm < 40 * 2**20
    assert peak2 - peak1 < split_bytes / 16


COMMON = ["model=lmu_tiny", "data=prepared", "data.num_workers=0", "data.max_frames=1500"]
COMMON += ["data.max_duration=8", "trainer.threads=1", "trainer.max_minutes=0", "tracking=off"]
COMMON += ["trainer.max_steps=24", "trainer.eval_every=24", "trainer.log_every=1"]
COMMON += ["checkpoint.every_steps=1000", "trainer.final_lm=false", "optim.warmup_steps=1"]
COMMON += ["trainer.batches_per_step=2"]


@pytest.mark.slow
def test_two_ranks_stopped_mid_epoch_resume_like_a_straight_run(prepared, tmp_path):
    """Two gloo ranks train from the shards; stopped by SIGTERM mid-epoch and started again, they
    end bitwise equal to two ranks that ran straight, with the same logged losses."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    base = [sys.executable, "-m", "lmu_asr.launch", *COMMON, f"data.dir={prepared}"]

    def start(run_dir: Path, port: int) -> list[subprocess.Popen]:
        env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        return [
            subprocess.Popen([*base, f"hydra.run.dir={run_dir}"],
                             env={**os.environ, **env, "RANK": str(r),
                                  "LOCAL_RANK": str(r), "PYTHONUNBUFFERED": "1"}, **kw)
            for r in range(2)
        ]  # fmt: skip

    def finish(procs: list[subprocess.Popen]) -> list[str]:
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(outs)
        return outs

    finish(start(straight, free_port()))
    procs = start(resumed, free_port())
    # A step takes about 30 ms: signalled at step 1, the ranks have 23 steps to agree and stop
    # (8 steps, signalled at step 3, once ran to the end on a loaded CI machine).
    wait_for_step(resumed, 1, procs[0])
    for p in procs:
        p.send_signal(signal.SIGTERM)
    finish(procs)
    (stopped_at,) = list_checkpoints(resumed)
    state = tensors(stopped_at, "train_state")
    assert 1 <= state["step"] < 24 and state["batch_in_epoch"] > 0  # mid-epoch
    outs = finish(start(resumed, free_port()))
    assert f"(step {state['step']}," in outs[0]

    a, b = (list_checkpoints(r)[-1] for r in (straight, resumed))
    assert a.name == b.name == "step-00000024"
    for item in ("model", "optimizer"):
        assert_bitwise_equal(tensors(a, item), tensors(b, item), item)
    sa, sb = tensors(a, "train_state"), tensors(b, "train_state")
    assert sa["rank_positions"] == sb["rank_positions"]
    assert logged_values(straight) == logged_values(resumed)
    results = [json.loads((r / "results.json").read_text()) for r in (straight, resumed)]
    assert results[0]["dev_wer"] == results[1]["dev_wer"]
    assert results[0]["test_wer"] == results[1]["test_wer"] is not None  # test split scored


def test_the_doctor_checks_the_prepared_folder(prepared, tmp_path):
    from lmu_asr.doctor import check_data
    from lmu_asr.launch import compose_config

    def checks(folder: Path) -> list:
        return list(check_data(compose_config(["data=prepared", f"data.dir={folder}"])))

    ((status, what, text),) = checks(prepared)
    hours = json.loads((prepared / "prepared.json").read_text())["splits"]["train"]["hours"]
    assert (status, what) == ("ok", "data") and f"train {hours:.1f} h" in text
    (tmp_path / "half" / "train").mkdir(parents=True)
    (tmp_path / "half" / "train" / "progress.json").write_text("{}")
    ((status, _, text),) = checks(tmp_path / "half")
    assert status == "FAIL" and "unfinished: run the prepare again" in text
    ((status, _, text),) = checks(tmp_path / "nothing")
    assert status == "FAIL" and "missing (python -m lmu_asr.prepare)" in text
