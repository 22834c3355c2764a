"""Reading a split written by `python -m lmu_asr.prepare` (`data=prepared data.dir=DIR`).

DIR/<split>/shard-NNNNN.parquet holds (id, audio bytes, text, duration) rows sorted by duration in
row groups of `rows_per_group`; DIR/<split>/index.parquet says where each utterance is.

What a rank holds: the index's numbers (duration, shard, row: 12 bytes an utterance, 100 MB for
XL's 8.3 M) and, per process (the trainer, each data worker), at most `data.cache_groups` row
groups of audio (`max_group_bytes` each, in prepared.json) and two row groups of the index's ids
and texts. Nothing else grows with the split. A length-bucketed batch of one shard is a run of
neighbouring rows, so it reads one or two row groups (`BucketBatchSampler(shards=...)`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow

    from lmu_asr.data import Utterance

FORMAT = 1
INDEX_COLUMNS = ["id", "duration", "shard", "row", "text"]


@dataclass(frozen=True)
class ShardAudio:
    """The audio bytes of one row of one shard, read when an utterance is decoded."""

    split: PreparedSplit = field(repr=False)
    shard: int
    row: int

    def load(self) -> bytes:
        return self.split.audio(self.shard, self.row)

    def __str__(self) -> str:
        return f"{self.split.shard_path(self.shard)} row {self.row}"


class PreparedSplit(Sequence):
    """The utterances of one prepared split, a sequence whose items are read on demand."""

    def __init__(self, folder: str | Path, split: str, cache_groups: int = 8) -> None:
        self.folder, self.split = Path(folder), split
        info_path = self.folder / "prepared.json"
        if not info_path.is_file():
            progress = self.folder / split / "progress.json"
            why = "the prepare was not finished: run it again" if progress.exists() else ""
            raise FileNotFoundError(
                f"data.dir={folder}: no prepared.json ({why or 'not made by lmu_asr.prepare'})"
            )
        info = json.loads(info_path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(
                f"{info_path}: format {info.get('format')!r}, this reader reads {FORMAT}"
            )
        if split not in info["splits"]:
            raise ValueError(f"{info_path}: no split {split!r} (has {sorted(info['splits'])})")
        self.info = info["splits"][split]
        self.rows_per_group = int(info["rows_per_group"])
        self.cache_groups = cache_groups
        import pyarrow.parquet as pq

        self._index: Any = pq.ParquetFile(self.folder / split / "index.parquet")
        index = self._index.read(columns=["duration", "shard", "row"])
        groups = range(self._index.num_row_groups)
        self.index_starts = np.cumsum(
            [0, *(self._index.metadata.row_group(g).num_rows for g in groups)]
        )
        self.durations = index["duration"].to_numpy().astype(np.float32)
        self.shards = index["shard"].to_numpy().astype(np.int32)
        self.rows = index["row"].to_numpy().astype(np.int32)
        if len(self.durations) != self.info["utterances"]:
            raise ValueError(
                f"{self.folder / split / 'index.parquet'}: {len(self.durations)} rows, "
                f"prepared.json says {self.info['utterances']}: prepare this split again"
            )
        self._groups: OrderedDict[tuple, pyarrow.Table] = OrderedDict()
        self._meta: OrderedDict[int, pyarrow.Table] = OrderedDict()
        self._files: OrderedDict[int, Any] = OrderedDict()
        self.groups_read = 0  # audio row groups read from disk by this process

    def __getstate__(self) -> dict:  # data workers start with empty caches
        empty = {"_groups": OrderedDict(), "_files": OrderedDict(), "_meta": OrderedDict()}
        return self.__dict__ | empty | {"_index": None}

    def __len__(self) -> int:
        return len(self.durations)

    def __getitem__(self, i: int) -> Utterance:
        from lmu_asr.data import Utterance

        if not -len(self) <= i < len(self):
            raise IndexError(f"utterance {i} of {len(self)}")
        i %= len(self)
        group = int(np.searchsorted(self.index_starts, i, side="right")) - 1
        if group not in self._meta:
            self._meta[group] = self._index_file().read_row_group(group, columns=["id", "text"])
            if len(self._meta) > 2:
                self._meta.popitem(last=False)
        meta, offset = self._meta[group], i - int(self.index_starts[group])
        audio = ShardAudio(self, int(self.shards[i]), int(self.rows[i]))
        text = meta["text"][offset].as_py()
        return Utterance(meta["id"][offset].as_py(), audio, text, float(self.durations[i]))

    def __iter__(self) -> Iterator[Utterance]:
        """In index order, reading only the index (ids and texts), never the shards' audio."""
        from lmu_asr.data import Utterance

        for batch in self._index_file().iter_batches(batch_size=4096, columns=INDEX_COLUMNS):
            for row in batch.to_pylist():
                audio = ShardAudio(self, row["shard"], row["row"])
                yield Utterance(row["id"], audio, row["text"], row["duration"])

    def shard_path(self, shard: int) -> Path:
        return self.folder / self.split / f"shard-{shard:05d}.parquet"

    def audio(self, shard: int, row: int) -> bytes:
        """The encoded audio of `row` of `shard`, from its row group (read once, then cached)."""
        group, offset = divmod(row, self.rows_per_group)
        key = (shard, group)
        if key in self._groups:
            self._groups.move_to_end(key)
        else:
            self._groups[key] = self._file(shard).read_row_group(group, columns=["audio"])
            self.groups_read += 1
            if len(self._groups) > self.cache_groups:
                self._groups.popitem(last=False)
        return self._groups[key]["audio"][offset].as_py()

    def _index_file(self) -> Any:
        import pyarrow.parquet as pq

        if self._index is None:
            self._index = pq.ParquetFile(self.folder / self.split / "index.parquet")
        return self._index

    def _file(self, shard: int) -> Any:
        import pyarrow.parquet as pq

        if shard not in self._files:
            path = self.shard_path(shard)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the prepared folder is incomplete")
            self._files[shard] = pq.ParquetFile(path)
            if len(self._files) > 4:
                self._files.popitem(last=False)
        self._files.move_to_end(shard)
        return self._files[shard]
