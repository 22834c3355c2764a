"""A small local copy of GigaSpeech, in its schema, with real encoded audio: the source the
prepare tests read instead of the gated hub dataset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

RATE = 16000
WORDS = ("THE", "DOG", "SAID", "IT'S", "A", "STATE-OF-THE-ART", "MODEL", "WELL", "UH", "I")
WORDS += ("THINK", "SO", "TODAY", "WE", "TALK", "GONNA", "AH", "TWENTY", "CAFÉ")
PUNCTUATION = ("<COMMA>", "<PERIOD>", "<QUESTIONMARK>", "<EXCLAMATIONPOINT>")
GARBAGE = ("<NOISE>", "<MUSIC>", "<SIL>", "<OTHER>")
SPLIT_FILES = {"train": 2, "validation": 1, "test": 1}

# Arrow type of the audio cell as `datasets` writes Audio(decode=False), plus its feature metadata
AUDIO_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FEATURES = (
    '{"info": {"features": {"segment_id": {"dtype": "string", "_type": "Value"}, '
    '"speaker": {"dtype": "string", "_type": "Value"}, '
    '"text": {"dtype": "string", "_type": "Value"}, '
    '"audio": {"decode": false, "_type": "Audio"}, '
    '"begin_time": {"dtype": "float32", "_type": "Value"}, '
    '"end_time": {"dtype": "float32", "_type": "Value"}, '
    '"audio_id": {"dtype": "string", "_type": "Value"}, '
    '"title": {"dtype": "string", "_type": "Value"}, '
    '"url": {"dtype": "string", "_type": "Value"}, '
    '"source": {"dtype": "int64", "_type": "Value"}, '
    '"category": {"dtype": "int64", "_type": "Value"}, '
    '"original_full_path": {"dtype": "string", "_type": "Value"}}}}'
)


def encoded_audio(seconds: float, fmt: str, rng: np.random.Generator) -> bytes:
    """`seconds` of a tone with noise (or noise alone), encoded as WAV or FLAC at 16 kHz."""
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) * rng.integers(0, 2)
    wav = (tone + rng.uniform(0.01, 0.1) * rng.standard_normal(len(t))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, wav, RATE, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def transcript(i: int, rng: np.random.Generator) -> str:
    """GigaSpeech style: upper case, punctuation tags; every 7th a garbage utterance, every 11th
    only tags (empty after the training rules)."""
    if i % 7 == 3:
        return GARBAGE[i % len(GARBAGE)]
    if i % 11 == 5:
        return "<UNK> <COMMA>"
    words = list(rng.choice(WORDS, size=int(rng.integers(2, 9))))
    words.insert(int(rng.integers(1, len(words))), PUNCTUATION[i % 2])
    return " ".join([*words, PUNCTUATION[i % len(PUNCTUATION)]])


def split_rows(split: str, n: int, folder: Path, rng: np.random.Generator) -> dict[str, list]:
    """`n` rows: mostly bytes (WAV and FLAC), a few with only a path to a file, one with no
    audio at all (unreadable); some rows have no begin/end time (durations from the audio)."""
    rows: dict[str, list] = {name: [] for name in ("segment_id", "speaker", "text", "audio")}
    rows |= {name: [] for name in ("begin_time", "end_time", "audio_id", "title", "url")}
    rows |= {name: [] for name in ("source", "category", "original_full_path")}
    begin = 0.0
    for i in range(n):
        seconds = float(np.round(rng.uniform(0.5, 3.0), 2))
        fmt = "FLAC" if i % 2 else "WAV"
        audio_id = f"{split.upper()}{i // 10:04d}"
        segment_id = f"{audio_id}_S{i:05d}"
        audio = {"bytes": encoded_audio(seconds, fmt, rng), "path": f"{segment_id}.{fmt.lower()}"}
        if i % 13 == 8:  # the audio lives in a file next to the parquet files
            path = folder / "audio" / audio["path"]
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(audio["bytes"])
            audio = {"bytes": None, "path": str(path)}
        if i == n - 2 and n > 20:
            audio = {"bytes": None, "path": None}
        times = (None, None) if i % 5 == 4 else (begin, begin + seconds)
        begin += seconds + 0.25
        values = [segment_id, "N/A", transcript(i, rng), audio, *times, audio_id]
        values += [f"Episode {audio_id}", f"https://example.org/{audio_id}", i % 3, i % 25]
        values += [f"audio/{split}/{audio_id}.opus"]
        for name, value in zip(rows, values):
            rows[name].append(value)
    return rows


def write_gigaspeech_source(
    folder: Path, n_train: int, n_dev: int, n_test: int, seed: int = 0
) -> Path:
    """GigaSpeech-schema parquet files in `folder` (train in two files, validation, test), as on
    the hub; `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "validation": n_dev, "test": n_test}
    for split, files in SPLIT_FILES.items():
        rows = split_rows(split, counts[split], folder, rng)
        table = pa.table(
            {
                name: pa.array(values, AUDIO_TYPE if name == "audio" else None)
                for name, values in rows.items()
            }
        )
        table = table.set_column(4, "begin_time", table["begin_time"].cast(pa.float32()))
        table = table.set_column(5, "end_time", table["end_time"].cast(pa.float32()))
        table = table.replace_schema_metadata({"huggingface": FEATURES})
        bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
        for k in range(files):
            part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
            pq.write_table(part, folder / f"{split}-{k:05d}-of-{files:05d}.parquet")
    return folder
