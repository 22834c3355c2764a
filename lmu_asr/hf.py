"""Reading utterances from a HuggingFace dataset: a local save_to_disk folder, parquet or arrow
file(s), or a hub dataset by name (HF_TOKEN for gated ones such as speechcolab/gigaspeech).

Audio is read with `Audio(decode=False)` and decoded later with soundfile (no torchcodec). For
datasets held in memory-mapped Arrow (everything but streaming) the audio bytes stay on disk until
an utterance is loaded: `HFAudio` points at one row.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from lmu_asr.data import DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFAudio:
    """Row `index` of a one-column (audio) HF dataset; `load()` gives its bytes or file path."""

    rows: Any = field(repr=False)  # datasets.Dataset, memory-mapped: cheap to pickle to workers
    index: int

    def load(self) -> bytes | str:
        cell = self.rows[self.index][self.rows.column_names[0]]
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            return cell["path"]
        raise ValueError(f"row {self.index} has neither audio bytes nor a path")


class HFRow(NamedTuple):
    id: str
    audio: bytes | str | HFAudio
    text: str
    duration: float | None  # from begin_time/end_time when the dataset has them


def open_hf(cfg: DataConfig, split: str) -> Any:
    """The `split` of the dataset named by cfg.hf_path or cfg.hf_name, audio not decoded."""
    import datasets  # imported here: it is slow to import and only this source needs it

    if cfg.hf_path:
        path = cfg.hf_path.replace("{split}", split)
        folder = Path(path)
        if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"data.hf_path {path} has splits {list(ds)}, not {split!r}")
                ds = ds[split]
        else:
            files = (
                sorted(glob.glob(str(folder / "*"))) if folder.is_dir() else sorted(glob.glob(path))
            )
            files = [f for f in files if f.endswith((".parquet", ".arrow"))]
            if not files:
                raise FileNotFoundError(
                    f"data.hf_path {path}: no dataset folder, parquet or arrow file"
                )
            kind = "parquet" if files[0].endswith(".parquet") else "arrow"
            ds = datasets.load_dataset(kind, data_files=files, split="train")
    else:
        ds = datasets.load_dataset(
            cfg.hf_name,
            cfg.hf_config,
            split=split,
            streaming=cfg.streaming,
            token=os.environ.get("HF_TOKEN"),
        )
    columns = ds.column_names  # None for a streamed dataset whose features are unknown
    wanted = [cfg.audio_column, cfg.text_column] + ([cfg.id_column] if cfg.id_column else [])
    for name in wanted:
        if columns is not None and name not in columns:
            where = cfg.hf_path or f"{cfg.hf_name} ({cfg.hf_config})"
            raise ValueError(f"{where} split {split!r}: no column {name!r} (columns: {columns})")
    return ds.cast_column(cfg.audio_column, datasets.Audio(decode=False))


def read_hf(cfg: DataConfig, split: str, rule: Callable[[str], str | None]) -> list[HFRow]:
    """Rows of `split` with text normalised by `rule`; rows for which it gives None (GigaSpeech
    garbage tags) are dropped and counted in a log message."""
    ds = open_hf(cfg, split)
    has_times = {"begin_time", "end_time"} <= set(ds.column_names or [])
    meta = [cfg.text_column] + ([cfg.id_column] if cfg.id_column else [])
    meta += ["begin_time", "end_time"] if has_times else []
    if cfg.streaming:  # no random access: the audio bytes are kept in memory
        log.warning("streaming %s: holding the audio of split %r in memory", cfg.hf_name, split)
        records = ({**row, "_audio": _audio_of(row[cfg.audio_column])} for row in ds)
        audio_rows = None
    else:
        columns = ds.select_columns(meta).to_dict()  # text, ids, times: small next to the audio
        records = ({c: columns[c][i] for c in meta} for i in range(len(ds)))
        audio_rows = ds.select_columns([cfg.audio_column])
    rows, dropped = [], 0
    for i, record in enumerate(records):
        raw = record[cfg.text_column]  # a missing (None) transcript is empty, not the word "none"
        text = rule("" if raw is None else str(raw))
        if text is None:
            dropped += 1
            continue
        utt_id = str(record[cfg.id_column]) if cfg.id_column else f"{split}-{i}"
        audio = record["_audio"] if audio_rows is None else HFAudio(audio_rows, i)
        duration = record["end_time"] - record["begin_time"] if has_times else None
        rows.append(HFRow(utt_id, audio, text, duration))
    if dropped:
        where = cfg.hf_path or cfg.hf_name
        log.info(
            "%s split %s: dropped %d of %d utterances with garbage tags",
            where,
            split,
            dropped,
            dropped + len(rows),
        )
    return rows


def _audio_of(cell: dict) -> bytes | str:
    return cell.get("bytes") or cell["path"]
