import dataclasses
import json
import multiprocessing
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile

from lmu_asr.corpus import (
    ESPEAK_VARIANTS,
    HELD_OUT_VOICES,
    TRAINING_VOICES,
    _plan,
    _speak,
    _Utt,
    build_corpus,
    build_unseen,
    check_voice,
)
from lmu_asr.wordnet import split_sentences, wordnet_sentences

pytestmark = pytest.mark.corpus
SMALL = dict(n_train=30, n_dev=6, n_test=6, seed=3, engines=["espeak-ng", "flite"], progress=False)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("corpus-cache")
    t0 = time.perf_counter()
    paths = build_corpus(**SMALL, cache_dir=cache)
    return paths, cache, time.perf_counter() - t0


def test_small_corpus_manifests_and_audio(small_corpus):
    paths, _, seconds = small_corpus
    assert seconds < 20
    for split, n in (("train", 30), ("dev", 6), ("test", 6)):
        rows = read_rows(paths[split])
        assert len(rows) == n
        for row in rows:
            assert set(row) == {"id", "audio", "text", "duration", "speaker"}
            assert re.fullmatch(r"[a-z' ]+", row["text"]) and 4 <= len(row["text"].split()) <= 20
            info = soundfile.info(paths[split].parent / row["audio"])
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert abs(info.duration - row["duration"]) < 1e-3 and row["duration"] > 0.5
            engine, voice = row["speaker"].split(":")
            assert engine in ("espeak-ng", "flite")
            check_voice(engine, voice)
    assert (paths["train"].parent / "LICENSE-WordNet.txt").read_text().count("Princeton") >= 2


def test_splits_use_disjoint_sentences(small_corpus):
    paths, _, _ = small_corpus
    texts = {split: {row["text"] for row in read_rows(path)} for split, path in paths.items()}
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]


def test_second_call_is_cached(small_corpus):
    paths, cache, _ = small_corpus
    mtime = paths["train"].stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_corpus(**SMALL, cache_dir=cache) == paths
    assert time.perf_counter() - t0 < 0.5
    assert paths["train"].stat().st_mtime_ns == mtime
    assert not list(cache.glob("*.tmp*"))


def test_same_arguments_give_the_same_bytes(small_corpus, tmp_path):
    paths, _, _ = small_corpus
    again = build_corpus(**SMALL, cache_dir=tmp_path)
    for split in paths:
        assert again[split].read_bytes() == paths[split].read_bytes()
        for row in read_rows(paths[split]):
            first = (paths[split].parent / row["audio"]).read_bytes()
            assert (again[split].parent / row["audio"]).read_bytes() == first


def test_festival_batches_do_not_change_the_audio(tmp_path):
    festival = dict(n_train=6, n_dev=1, n_test=1, seed=1, engines=["festival"], progress=False)
    one = build_corpus(**festival, jobs=1, cache_dir=tmp_path / "one")
    three = build_corpus(**festival, jobs=3, cache_dir=tmp_path / "three")
    assert one["train"].read_bytes() == three["train"].read_bytes()
    for row in read_rows(one["train"]):
        assert row["speaker"].split(":")[0] == "festival"
        wav = (one["train"].parent / row["audio"]).read_bytes()
        assert (three["train"].parent / row["audio"]).read_bytes() == wav


def test_other_seed_gives_another_corpus(small_corpus, tmp_path):
    paths, _, _ = small_corpus
    other = build_corpus(**{**SMALL, "seed": 4, "n_train": 4}, cache_dir=tmp_path)
    assert other["train"].parent != paths["train"].parent
    assert read_rows(other["dev"]) != read_rows(paths["dev"])


def test_cli_prints_the_cached_paths(small_corpus):
    paths, cache, _ = small_corpus
    cmd = [sys.executable, "-m", "lmu_asr.corpus", "--train", "30", "--dev", "6", "--test", "6"]
    cmd += ["--seed", "3", "--engines", "espeak-ng,flite", "--cache-dir", str(cache)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == {split: str(path) for split, path in paths.items()}


def _build_tiny(cache):
    return str(
        build_corpus(3, 1, 1, seed=9, engines=["espeak-ng"], cache_dir=cache, progress=False)[
            "train"
        ]
    )


def test_concurrent_builds_of_one_corpus_agree(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_build_tiny, [tmp_path, tmp_path])
    assert results[0] == results[1]
    assert len(read_rows(type(tmp_path)(results[0]))) == 3
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [
        type(tmp_path)(results[0]).parent.name
    ]


@pytest.mark.parametrize(
    "engine, voice",
    [("flite", "slt"), ("festival", "cmu_us_slt_arctic_hts"), ("festival", "nitech_us_awb_hts")],
)
def test_reserved_voices_are_refused(engine, voice):
    with pytest.raises(ValueError, match="reserved for held-out evaluation"):
        check_voice(engine, voice)


def test_a_build_refuses_a_reserved_voice(tmp_path, monkeypatch):
    monkeypatch.setitem(TRAINING_VOICES, "flite", ("slt",))
    with pytest.raises(ValueError, match="flite:slt is reserved"):
        build_corpus(1, 1, 1, engines=["flite"], cache_dir=tmp_path, progress=False)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]  # no corpus, no temp folder


def test_only_listed_voices_are_allowed():
    for engine, voices in TRAINING_VOICES.items():
        for voice in voices:
            check_voice(engine, voice)
    with pytest.raises(ValueError, match="not a training voice"):
        check_voice("flite", "kal")
    with pytest.raises(ValueError, match="engines"):
        build_corpus(engines=["festival-hts"])


def test_espeak_variants_exist():
    # espeak-ng silently falls back to its default voice for an unknown variant
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True)
    files = {line.split()[4].split("/")[-1] for line in listing.stdout.splitlines()[1:]}
    assert set(ESPEAK_VARIANTS) <= files


def test_missing_engine_names_the_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="apt-get install .*espeak-ng flite festival.* sox"):
        build_corpus(2, 1, 1, cache_dir=tmp_path, progress=False)


def test_wordnet_sentences_are_normalised_and_bounded():
    sentences = wordnet_sentences()
    assert 30000 < len(sentences) < 40000
    assert len(set(sentences)) == len(sentences)
    assert all(re.fullmatch(r"[a-z' ]+", s) and 4 <= len(s.split()) <= 20 for s in sentences)


def test_split_sentences_is_disjoint_and_seeded():
    sentences = [f"sentence {i}" for i in range(100)]
    splits = split_sentences(sentences, 80, 10, 10, seed=1, unseen_pool=0)
    assert splits == split_sentences(sentences, 80, 10, 10, seed=1, unseen_pool=0)
    assert splits != split_sentences(sentences, 80, 10, 10, seed=2, unseen_pool=0)
    assert set(sum(splits.values(), [])) == set(sentences)
    # test sentences do not depend on the train size; train cycles past the end
    longer = split_sentences(sentences, 500, 10, 10, seed=1, unseen_pool=0)
    assert longer["test"] == splits["test"] and not set(longer["train"]) & set(splits["test"])
    with pytest.raises(ValueError, match="no WordNet sentences"):
        split_sentences(sentences, 1, 50, 50, seed=1, unseen_pool=0)


def test_unseen_sentences_are_their_own_whatever_the_other_sizes():
    sentences = [f"sentence {i}" for i in range(100)]
    small = split_sentences(sentences, 5, 10, 10, seed=1, n_unseen=8, unseen_pool=20)
    big = split_sentences(sentences, 500, 30, 30, seed=1, n_unseen=8, unseen_pool=20)
    assert small["unseen"] == big["unseen"] and len(set(big["unseen"])) == 8
    others = {s for split in ("train", "dev", "test") for s in big[split]}  # train cycles
    assert not others & set(big["unseen"])
    assert split_sentences(sentences, 5, 10, 10, seed=1, unseen_pool=20)["unseen"] == []
    with pytest.raises(ValueError, match="at most 20"):
        split_sentences(sentences, 5, 10, 10, seed=1, n_unseen=21, unseen_pool=20)


def test_unseen_split_has_only_reserved_voices_and_new_sentences(small_corpus):
    paths, cache, _ = small_corpus
    unseen = build_unseen(8, seed=SMALL["seed"], cache_dir=cache, progress=False)
    assert unseen.parent.name.startswith("unseen-") and unseen.parent != paths["train"].parent
    rows = read_rows(unseen)
    assert len(rows) == 8
    reserved = {f"{e}:{v}" for e, vs in HELD_OUT_VOICES.items() for v in vs}
    assert {row["speaker"] for row in rows} == reserved  # both reserved voices speak
    for row in rows:
        with pytest.raises(ValueError, match="reserved for held-out"):
            check_voice(*row["speaker"].split(":"))
        info = soundfile.info(unseen.parent / row["audio"])
        assert (info.samplerate, info.channels) == (16000, 1) and row["duration"] > 0.5
    texts = {text for path in paths.values() for text in (r["text"] for r in read_rows(path))}
    assert not texts & {row["text"] for row in rows}
    assert build_unseen(8, seed=SMALL["seed"], cache_dir=cache, progress=False) == unseen


def test_only_the_demo_corpus_has_an_unseen_split(tmp_path):
    from lmu_asr.data import DataConfig, load_split

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    cfg = DataConfig(source="manifest", manifest=str(manifest))
    with pytest.raises(ValueError, match="unseen-voices split is only for data.source=demo"):
        load_split(cfg, "unseen")
    with pytest.raises(ValueError, match="unseen-voices split is 0"):
        load_split(DataConfig(corpus_unseen=0), "unseen")


def test_demo_source_loads_the_built_corpus(tmp_path):
    from lmu_asr.data import DataConfig, SpeechDataset, load_split

    cfg = DataConfig(corpus_train=8, corpus_dev=2, corpus_test=2, cache_dir=str(tmp_path))
    utts = load_split(cfg, "dev")
    assert len(utts) == 2 and all(u.duration > 0.5 and u.text for u in utts)
    items = [SpeechDataset(utts)[i] for i in range(2)]
    assert all(
        item.wav.ndim == 1 and len(item.tokens) == len(u.text)
        for item, u in zip(items, utts, strict=True)
    )


def _median_frequency(path):
    x, rate = soundfile.read(path)
    power = np.abs(np.fft.rfft(x)) ** 2
    return np.fft.rfftfreq(len(x), 1 / rate)[np.searchsorted(np.cumsum(power) / power.sum(), 0.5)]


def test_a_voice_size_shift_scales_the_spectrum_and_keeps_the_duration(tmp_path):
    """Corpus v4 speaks half the training utterances from a larger or smaller voice (sox pitch:
    pitch and formants together): the spectrum scales by 2^(cents/1200) (measured: 1.332 for
    +500, 0.850 for -300) while the duration, which CTC's frames depend on, stays within 3%."""
    (tmp_path / "wav" / "train").mkdir(parents=True)
    text = "the quick brown fox jumps over the lazy dog"
    base = _Utt("train-000000", "train", text, "flite", "kal16", 1.0, 0)
    plain = _speak(tmp_path, base)
    for i, cents in enumerate((500, -300), start=1):
        moved = _speak(tmp_path, dataclasses.replace(base, id=f"train-{i:06d}", shift=cents))
        ratio = _median_frequency(tmp_path / moved["audio"]) / _median_frequency(
            tmp_path / plain["audio"]
        )
        assert ratio == pytest.approx(2 ** (cents / 1200), rel=0.05), cents
        assert moved["duration"] == pytest.approx(plain["duration"], rel=0.03)


def test_half_the_training_voices_are_resized_and_no_unseen_one():
    training = [_plan("train", i, "a b", 0, list(TRAINING_VOICES)) for i in range(2000)]
    shifts = np.array([u.shift for u in training])
    assert 0.45 < (shifts != 0).mean() < 0.55
    assert shifts.min() >= -300 and shifts.max() <= 500 and (shifts > 300).any()
    assert all(_plan("unseen", i, "a b", 0, []).shift == 0 for i in range(200))
