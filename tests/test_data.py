import io
import json
import logging

import numpy as np
import pytest
import soundfile
import torch

from lmu_asr.data import (
    DataConfig,
    HFAudio,
    Item,
    Skipped,
    SpeechDataset,
    Utterance,
    load_split,
    read_manifest,
)
from lmu_asr.text import encode
from tests.conftest import AUDIO_FILES, tone

# --- config ----------------------------------------------------------------------------------


def test_data_config_defaults():
    cfg = DataConfig()
    assert (cfg.source, cfg.max_frames, cfg.max_duration, cfg.sample_rate) == (
        "demo",
        20000,
        20.0,
        16000,
    )
    assert (cfg.hf_train_split, cfg.hf_dev_split, cfg.hf_test_split) == (
        "train",
        "validation",
        "test",
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"source": "s3"}, "data.source='s3'"),
        ({"text_rules": "kaldi"}, "data.text_rules"),
        ({"source": "manifest"}, "data.manifest"),
        ({"source": "hf"}, "data.hf_name"),
        ({"source": "hf", "hf_name": "a", "hf_path": "b"}, "data.hf_name"),
        ({"streaming": True, "hf_path": "x"}, "data.streaming"),
        ({"max_frames": 1000}, "data.max_frames=1000"),
        ({"max_duration": 0}, "data.max_duration"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"sample_rate": 16001}, "data.sample_rate"),
    ],
)
def test_data_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)


# --- manifests -------------------------------------------------------------------------------


def test_read_manifest_resolves_paths_normalises_text_and_reads_durations(audio_files):
    utts = read_manifest(audio_files["manifest"])
    assert [u.id for u in utts] == list(AUDIO_FILES)
    assert utts[0].text == "hello world it's two pm"
    assert utts[0].audio == str(audio_files["wav"])
    for utt, (_, seconds, *_) in zip(utts, AUDIO_FILES.values(), strict=True):
        assert utt.duration == pytest.approx(seconds, abs=0.01)


def test_manifest_absolute_paths_default_ids_and_given_durations(audio_files, tmp_path):
    manifest = tmp_path / "m.jsonl"
    row = {"audio": str(audio_files["flac"]), "text": "x y", "duration": 9.5}
    manifest.write_text(json.dumps(row) + "\n\n")
    (utt,) = read_manifest(manifest)
    assert (utt.id, utt.audio, utt.duration) == (
        str(audio_files["flac"]),
        str(audio_files["flac"]),
        9.5,
    )


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"audio": "a.wav"}', "m.jsonl:2: missing key 'text'"),
        ("{oops", "m.jsonl:2: not valid JSON"),
        ('{"audio": "a.wav", "text": "a", "duration": "long"}', "m.jsonl:2: duration must be"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav", "text": "a", "duration": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_manifest(manifest)


def test_unreadable_audio_in_manifest_gets_zero_duration_or_strict_error(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "missing.wav", "text": "a"}\n')
    assert read_manifest(manifest)[0].duration == 0.0
    with pytest.raises(ValueError, match=r"m.jsonl:1: cannot read audio"):
        read_manifest(manifest, strict=True)


def test_load_split_manifest_maps_splits(audio_files):
    path = str(audio_files["manifest"])
    cfg = DataConfig(source="manifest", manifest=path, test_manifest=path)
    assert len(load_split(cfg, "train")) == len(load_split(cfg, "test")) == len(AUDIO_FILES)
    with pytest.raises(ValueError, match="data.dev_manifest is not set"):
        load_split(cfg, "dev")
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(cfg, "validation")


# --- dataset: decoding -----------------------------------------------------------------------


def spectrum(wav: torch.Tensor, rate: int = 16000) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies in Hz, amplitude of each) of a Hann-windowed signal; a sine of amplitude a
    shows as a peak of height a."""
    x = wav.numpy().astype(np.float64)
    window = np.hanning(len(x))
    amplitude = 2 * np.abs(np.fft.rfft(x * window)) / window.sum()
    return np.fft.rfftfreq(len(x), 1 / rate), amplitude


def peaks(wav: torch.Tensor, n: int = 1) -> list[tuple[float, float]]:
    """The n strongest (frequency, amplitude) peaks, at least 50 Hz apart, lowest first."""
    freqs, amp = spectrum(wav)
    found: list[tuple[float, float]] = []
    for i in np.argsort(amp)[::-1]:
        if all(abs(freqs[i] - f) > 50 for f, _ in found):
            found.append((float(freqs[i]), float(amp[i])))
        if len(found) == n:
            break
    return sorted(found)


@pytest.mark.parametrize("name", list(AUDIO_FILES))
def test_dataset_decodes_each_format_to_16k_mono(audio_files, name):
    _, seconds, *_, text = AUDIO_FILES[name]
    utt = Utterance(name, str(audio_files[name]), "some words", seconds)
    item = SpeechDataset([utt])[0]
    assert isinstance(item, Item) and item.id == name
    assert item.wav.dtype == torch.float32 and item.wav.ndim == 1
    assert abs(len(item.wav) - seconds * 16000) <= 16000 * 0.01  # resampled, codec delay
    assert item.tokens.tolist() == encode("some words")
    # the signal itself: the 220 Hz tone of amplitude 0.3 (conftest.tone) at 16 kHz; read at
    # the wrong rate, 22.05 / 48 kHz would show it at 160 / 73 Hz
    ((freq, amplitude),) = peaks(item.wav)
    assert freq == pytest.approx(220, abs=2)
    assert amplitude == pytest.approx(0.3, rel=0.1)


def test_stereo_is_mixed_down_to_the_mean_of_its_channels(tmp_path):
    left, right = tone(1.0, 44100, freq=300), tone(1.0, 44100, freq=1000)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, np.stack([left, right], axis=1), 44100)
    wav = SpeechDataset([Utterance("s", str(path), "two tones", 1.0)])[0].wav
    assert len(wav) == 16000
    (f1, a1), (f2, a2) = peaks(wav, 2)
    assert (f1, f2) == (pytest.approx(300, abs=2), pytest.approx(1000, abs=2))
    # each channel's 0.3 halved: the mean, neither one channel alone nor the sum
    assert (a1, a2) == (pytest.approx(0.15, rel=0.1), pytest.approx(0.15, rel=0.1))


def test_dataset_decodes_bytes(audio_files):
    data = audio_files["flac"].read_bytes()
    item = SpeechDataset([Utterance("b", data, "bytes", 1.5)])[0]
    assert len(item.wav) == 24000


# --- dataset: bad input ----------------------------------------------------------------------


def _write(path, seconds, rate=16000):
    soundfile.write(path, tone(seconds, rate), rate)
    return str(path)


@pytest.fixture
def bad_utterances(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00not really a wav file" * 10)
    ok = _write(tmp_path / "ok.wav", 1.0)
    return {
        "unreadable audio": Utterance("corrupt", str(corrupt), "text", 1.0),
        "missing file": Utterance("missing", str(tmp_path / "nope.flac"), "text", 1.0),
        "empty audio": Utterance("empty", _write(tmp_path / "empty.wav", 0.0), "text", 0.0),
        "empty transcript": Utterance("blank", ok, " ", 1.0),
        "out-of-alphabet": Utterance("upper", ok, "Hello!", 1.0),
        "too long": Utterance("long", _write(tmp_path / "long.wav", 2.5), "text", 2.5),
        "too long (header)": Utterance("long2", ok, "text", 99.0),
        # 0.3 s: 31 frames -> 7 after 4x subsampling; "a b c d" needs 7, "aaaa" needs 7 too
        "ctc infeasible": Utterance("ctc", _write(tmp_path / "short.wav", 0.3), "abcdefgh", 0.3),
        "ctc repeats": Utterance("rep", str(tmp_path / "short.wav"), "aaaaa", 0.3),
    }


EXPECTED_REASON = {"missing file": "unreadable audio", "too long (header)": "too long"}
EXPECTED_REASON["ctc repeats"] = "ctc infeasible"


@pytest.mark.parametrize(
    "case",
    [
        "unreadable audio",
        "missing file",
        "empty audio",
        "empty transcript",
        "out-of-alphabet",
        "too long",
        "too long (header)",
        "ctc infeasible",
        "ctc repeats",
    ],
)
def test_bad_utterance_is_skipped_with_a_reason_or_raises_in_strict_mode(bad_utterances, case):
    utt = bad_utterances[case]
    item = SpeechDataset([utt], max_duration=2.0, subsampling=4)[0]
    assert item == Skipped(utt.id, EXPECTED_REASON.get(case, case))
    strict = SpeechDataset([utt], max_duration=2.0, subsampling=4, strict=True)
    with pytest.raises(ValueError, match=f"utterance {utt.id} \\({utt.audio}\\)"):
        strict[0]


def test_ctc_feasibility_counts_repeats_and_subsampling(tmp_path):
    path = _write(tmp_path / "short.wav", 0.3)  # 31 feature frames
    fits = SpeechDataset([Utterance("x", path, "abcdefg", 0.3)], subsampling=4)[0]  # 7 <= 7
    assert isinstance(fits, Item)
    assert isinstance(SpeechDataset([Utterance("x", path, "aaaa", 0.3)], subsampling=4)[0], Item)
    no_subsampling = SpeechDataset([Utterance("x", path, "a" * 16, 0.3)], subsampling=1)[0]
    assert isinstance(no_subsampling, Item)  # 31 needed of 31
    assert isinstance(
        SpeechDataset([Utterance("x", path, "a" * 17, 0.3)], subsampling=1)[0], Skipped
    )
    with pytest.raises(ValueError, match="subsampling"):
        SpeechDataset([], subsampling=3)


# --- HF datasets (offline) -------------------------------------------------------------------


def gigaspeech_rows(prefix: str) -> dict:
    """Four rows in GigaSpeech's schema; the third is a garbage utterance."""

    def encoded(seconds, fmt):
        buffer = io.BytesIO()
        soundfile.write(buffer, tone(seconds), 16000, format=fmt)
        return {"bytes": buffer.getvalue(), "path": f"{prefix}.{fmt.lower()}"}

    return {
        "segment_id": [f"{prefix}_{i}" for i in range(4)],
        "speaker": ["N/A"] * 4,
        "text": [
            "I HAVE A DOG <PERIOD>",
            "WELL <COMMA> UH IT'S STATE-OF-THE-ART <QUESTIONMARK>",
            "<NOISE>",
            "<UNK> TWENTY ONE <EXCLAMATIONPOINT>",
        ],
        "audio": [
            encoded(1.0, "WAV"),
            encoded(1.5, "FLAC"),
            encoded(0.5, "WAV"),
            encoded(1.2, "FLAC"),
        ],
        "begin_time": [10.0, 20.0, 30.0, 40.0],
        "end_time": [11.0, 21.5, 30.5, 41.2],
    }


def make_dataset(datasets, prefix):
    ds = datasets.Dataset.from_dict(gigaspeech_rows(prefix))
    return ds.cast_column("audio", datasets.Audio(decode=False))  # no torchcodec needed


def check_gigaspeech_utterances(utts, prefix):
    assert [u.id for u in utts] == [f"{prefix}_0", f"{prefix}_1", f"{prefix}_3"]
    assert [u.text for u in utts] == ["i have a dog", "well uh it's state of the art", "twenty one"]
    assert [u.duration for u in utts] == pytest.approx([1.0, 1.5, 1.2])
    assert all(isinstance(u.audio, HFAudio) for u in utts)
    items = [SpeechDataset(utts)[i] for i in range(len(utts))]
    assert [len(item.wav) for item in items] == [16000, 24000, 19200]


def test_hf_parquet_with_gigaspeech_rules(hf_offline, tmp_path, caplog):
    path = tmp_path / "gs-train.parquet"
    make_dataset(hf_offline, "train").to_parquet(str(path))
    cfg = DataConfig(
        source="hf", hf_path=str(tmp_path / "gs-{split}.parquet"), text_rules="gigaspeech"
    )
    with caplog.at_level(logging.INFO, logger="lmu_asr"):
        utts = load_split(cfg, "train")
    check_gigaspeech_utterances(utts, "train")
    assert "dropped 1 of 4 utterances with garbage tags" in caplog.text


def test_hf_save_to_disk_dataset_dict_maps_dev_to_validation(hf_offline, tmp_path):
    splits = {name: make_dataset(hf_offline, name) for name in ("train", "validation", "test")}
    hf_offline.DatasetDict(splits).save_to_disk(str(tmp_path / "gs"))
    cfg = DataConfig(source="hf", hf_path=str(tmp_path / "gs"), text_rules="gigaspeech")
    check_gigaspeech_utterances(load_split(cfg, "dev"), "validation")
    check_gigaspeech_utterances(load_split(cfg, "test"), "test")


def test_hf_without_times_reads_durations_and_checks_columns(hf_offline, tmp_path):
    ds = make_dataset(hf_offline, "x").remove_columns(["begin_time", "end_time"])
    ds.save_to_disk(str(tmp_path / "plain"))
    cfg = DataConfig(source="hf", hf_path=str(tmp_path / "plain"), id_column=None)
    utts = load_split(cfg, "train")  # plain rules: the garbage tag is just text
    assert [u.id for u in utts] == ["train-0", "train-1", "train-2", "train-3"]
    assert [u.duration for u in utts] == pytest.approx([1.0, 1.5, 0.5, 1.2])
    with pytest.raises(ValueError, match="no column 'sentence'"):
        load_split(
            DataConfig(source="hf", hf_path=str(tmp_path / "plain"), text_column="sentence"), "test"
        )


def test_hf_audio_reference_is_cheap_to_pickle(hf_offline, tmp_path):
    import pickle

    make_dataset(hf_offline, "p").save_to_disk(str(tmp_path / "p"))
    utts = load_split(DataConfig(source="hf", hf_path=str(tmp_path / "p")), "train")
    assert len(pickle.dumps(utts)) < 20000  # memory-mapped rows travel by path, not by bytes
    assert np.isclose(utts[1].duration, 1.5)
