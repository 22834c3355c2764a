import random

import pytest
import torch

from lmu_asr.data import (
    Batch,
    BucketBatchSampler,
    Item,
    SkipCounter,
    Skipped,
    SpeechDataset,
    Utterance,
    collate,
    make_loader,
    num_frames,
)
from tests.conftest import AUDIO_FILES

LENGTHS = [random.Random(0).randint(50, 900) for _ in range(203)]


def item(utt_id, samples, tokens):
    return Item(utt_id, torch.ones(samples), torch.arange(1, tokens + 1))


def test_collate_pads_and_lists_skipped_items():
    batch = collate([item("a", 5, 2), Skipped("x", "too long"), item("b", 3, 4)])
    assert batch.wav.shape == (2, 5) and batch.wav.dtype == torch.float32
    assert batch.wav[1].tolist() == [1, 1, 1, 0, 0]
    assert batch.wav_lens.tolist() == [5, 3] and batch.token_lens.tolist() == [2, 4]
    assert batch.tokens.tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]
    assert batch.ids == ["a", "b"] and batch.skipped == [("x", "too long")]
    assert len(batch) == 2 and batch.to("cpu").tokens.equal(batch.tokens)


def test_collate_of_only_skipped_items_is_an_empty_batch():
    batch = collate([Skipped("x", "empty audio")])
    assert len(batch) == 0 and batch.wav.shape == (0, 0) and batch.tokens.shape == (0, 0)
    assert batch.skipped == [("x", "empty audio")]


def test_loader_with_workers_reports_skips_through_batches(audio_files):
    utts = [Utterance(n, str(audio_files[n]), "some words", f[1]) for n, f in AUDIO_FILES.items()]
    utts += [Utterance("bad", str(audio_files["manifest"]), "text", 1.0)]
    utts += [Utterance("long", str(audio_files["wav"]), "text", 30.0)]
    dataset = SpeechDataset(utts)
    sampler = BucketBatchSampler([num_frames(min(u.duration, 20)) for u in utts], 4000, seed=1)
    counter, ids = SkipCounter(), []
    for batch in make_loader(dataset, sampler, num_workers=2):
        assert isinstance(batch, Batch)
        counter.add(batch)
        ids += batch.ids
    assert sorted(ids) == sorted(AUDIO_FILES)
    assert counter.counts == {"unreadable audio": 1, "too long": 1}
    assert counter.summary().startswith("skipped 2 utterances: ")
    assert "unreadable audio 1" in counter.summary() and "bad" in counter.summary()


def test_skip_counter_summary_lists_counts_and_first_ids():
    counter = SkipCounter(max_ids=2)
    assert counter.summary() == "skipped 0 utterances"
    counter.add([("a", "too long"), ("b", "ctc infeasible"), ("c", "too long")])
    assert counter.total == 3
    assert (
        counter.summary() == "skipped 3 utterances: too long 2, ctc infeasible 1 (first: a, b, ...)"
    )
    counter.reset()
    assert counter.total == 0
    # the same bad utterance in every epoch is counted each time but named once
    counter.add([("a", "too long")] * 3 + [("b", "too long")])
    assert counter.total == 4 and counter.first_ids == ["a", "b"]


# --- sampler ---------------------------------------------------------------------------------


def epoch_batches(sampler, epoch, skip=0):
    sampler.set_epoch(epoch, skip)
    return list(sampler)


def test_batches_respect_the_frame_budget_and_cover_every_utterance_once():
    sampler = BucketBatchSampler(LENGTHS, max_frames=3000, seed=0)
    batches = epoch_batches(sampler, 0)
    assert all(len(b) * max(LENGTHS[i] for i in b) <= 3000 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    spread = [max(LENGTHS[i] for i in b) / min(LENGTHS[i] for i in b) for b in batches]
    assert max(spread) < 1.25  # bucketed: little padding
    assert len(sampler) == sampler.num_batches == len(batches)


def test_order_is_a_function_of_seed_and_epoch():
    sampler = BucketBatchSampler(LENGTHS, 3000, seed=5)
    first = epoch_batches(sampler, 0)
    assert epoch_batches(sampler, 0) == first
    assert epoch_batches(sampler, 1) != first
    assert epoch_batches(BucketBatchSampler(LENGTHS, 3000, seed=6), 0) != first
    unshuffled = epoch_batches(BucketBatchSampler(LENGTHS, 3000, shuffle=False), 3)
    assert unshuffled == epoch_batches(BucketBatchSampler(LENGTHS, 3000, shuffle=False), 0)
    assert [LENGTHS[b[0]] for b in unshuffled] == sorted(LENGTHS[b[0]] for b in unshuffled)


def test_resume_mid_epoch_gives_the_remaining_batches():
    full = epoch_batches(BucketBatchSampler(LENGTHS, 3000, seed=2), 4)
    for consumed in (0, 1, 7, len(full)):
        interrupted = BucketBatchSampler(LENGTHS, 3000, seed=2)
        interrupted.set_epoch(4, consumed)
        resumed = BucketBatchSampler(LENGTHS, 3000, seed=99)
        resumed.load_state_dict(interrupted.state_dict())
        assert len(resumed) == len(full) - consumed
        assert list(resumed) == full[consumed:]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_get_equal_disjoint_shards_covering_everything(world_size):
    single = epoch_batches(BucketBatchSampler(LENGTHS, 3000, seed=3), 1)
    shards = [
        epoch_batches(BucketBatchSampler(LENGTHS, 3000, seed=3, rank=r, world_size=world_size), 1)
        for r in range(world_size)
    ]
    assert len({len(shard) for shard in shards}) == 1
    together = [b for shard in shards for b in shard]
    padding = -len(single) % world_size
    assert len(together) == len(single) + padding
    assert sorted(map(tuple, together)) == sorted(map(tuple, single + single[:padding]))
    assert len({i for b in together for i in b}) == len(LENGTHS)


def test_fewer_batches_than_ranks_still_gives_every_rank_one():
    shards = [list(BucketBatchSampler([10, 12], 100, rank=r, world_size=4)) for r in range(4)]
    assert all(len(shard) == 1 for shard in shards)


def test_utterance_longer_than_the_budget_is_refused():
    with pytest.raises(ValueError, match="max_frames=500"):
        BucketBatchSampler([100, 501], max_frames=500)
    with pytest.raises(ValueError, match="rank 2"):
        BucketBatchSampler([100], 500, rank=2, world_size=2)
