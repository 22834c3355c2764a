"""Prepare GigaSpeech once, on shared storage, into parquet shards that every training rank reads.

    python -m lmu_asr.prepare gigaspeech --subset xs --out DIR [--from PATH] [--splits train,dev]
    python -m lmu_asr.prepare verify DIR

The source is the hub (speechcolab/gigaspeech, gated: HF_TOKEN) or, with --from, a local copy in
its schema (parquet files, or a save_to_disk folder); its splits train/validation/test are written
as train/dev/test. What DIR holds:

  DIR/<split>/shard-NNNNN.parquet  id, audio (encoded bytes, as in the source), text (GigaSpeech
                                   rules), duration (s). A shard is the next kept source rows up to
                                   --shard-mb MB (10^6 bytes) of audio, sorted by (duration, id),
                                   in row groups of --rows-per-group rows.
  DIR/<split>/index.parquet        every utterance: id, duration, shard, row, text
  DIR/<split>/progress.json        the resume point: shards done, source rows consumed, drops
  DIR/prepared.json                written last (its presence means complete): options, counts,
                                   hours, drops by reason, each shard's size and sha256

A prepare killed at any moment and run again with the same options continues where it stopped
and writes the same files as one uninterrupted run; `verify DIR` re-hashes the shards.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from lmu_asr.prepared import FORMAT  # what the reader reads
from lmu_asr.progress import LoopProgress
from lmu_asr.text import gigaspeech_train_text

log = logging.getLogger(__name__)

HUB = "speechcolab/gigaspeech"
SUBSETS = ("xs", "s", "m", "l", "xl")
SPLITS = ("train", "dev", "test")
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
HOURS = {"xs": 10, "s": 250, "m": 1000, "l": 2500, "xl": 10000, "dev": 12, "test": 40}
REQUIRED = ("segment_id", "text", "audio")
OPTIONS = ("format", "dataset", "subset", "source", "text_rules", "shard_mb", "rows_per_group")
INDEX_GROUP_ROWS = 16384  # about 2 MB of ids and texts
MAX_SHARD_MB = 1024.0  # a parquet binary column holds at most 2 GiB per array
SHARD_SCHEMA = pa.schema(
    [("id", pa.string()), ("audio", pa.binary()), ("text", pa.string()), ("duration", pa.float64())]
)
INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("duration", pa.float64()),
        ("shard", pa.int32()),
        ("row", pa.int32()),
        ("text", pa.string()),
    ]
)

Utterance = tuple[str, bytes, str, float]  # id, encoded audio, normalised text, seconds


def prepare(
    subset: str,
    out: Path,
    source: str | None = None,
    splits: Sequence[str] = SPLITS,
    shard_mb: float = 256.0,
    rows_per_group: int = 32,
) -> dict:
    """Write `splits` of GigaSpeech `subset` into `out` (see the module docstring) and return the
    prepared.json dict. `source`: a local copy (parquet folder or save_to_disk folder); None reads
    the hub. Resumes a killed run; a complete `out` is left as it is."""
    _check_arguments(subset, splits, shard_mb, rows_per_group)
    out = Path(out)
    options = {
        "format": FORMAT,
        "dataset": "gigaspeech",
        "subset": subset,
        "source": HUB if source is None else str(Path(source).resolve()),
        "text_rules": "gigaspeech",
        "shard_mb": float(shard_mb),
        "rows_per_group": int(rows_per_group),
    }
    done = _read_json(out / "prepared.json")
    if done is not None:
        _check_options(done, options, out / "prepared.json")
        if set(splits) <= set(done["splits"]):
            log.info("%s is complete already (splits %s): nothing to do", out, ", ".join(splits))
            return done
    old = done["splits"] if done else {}
    entries, group_max, seconds = {}, [done["max_group_bytes"] if done else 0], 0.0
    for split in [s for s in SPLITS if s in splits or s in old]:
        if split in old:
            entries[split] = old[split]
            continue
        progress = _prepare_split(out, split, options)
        entries[split] = _split_entry(progress)
        group_max += progress["group_bytes"]
        seconds += progress["seconds"]
    manifest = options | {
        "max_group_bytes": max(group_max),
        "splits": entries,
        "seconds": round((done["seconds"] if done else 0.0) + seconds, 3),
    }
    _write_json(out / "prepared.json", manifest)
    return manifest


def verify(out: Path) -> list[str]:
    """What is wrong with the prepared folder `out`: shards missing, or whose size or sha256 is
    not the one prepared.json gives, index files missing or of another length. [] when sound."""
    out = Path(out)
    manifest = _read_json(out / "prepared.json")
    if manifest is None:
        return [f"{out / 'prepared.json'}: missing (the prepare did not finish)"]
    problems = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = out / shard["file"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != shard["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, not {shard['bytes']}")
            elif _sha256(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 {_sha256(path)}, not {shard['sha256']}")
        index = out / split / "index.parquet"
        if not index.is_file():
            problems.append(f"{index}: missing")
        elif (rows := pq.ParquetFile(index).metadata.num_rows) != info["utterances"]:
            problems.append(f"{index}: {rows} rows, not {info['utterances']}")
    return problems


# --- one split --------------------------------------------------------------------------------


def _prepare_split(out: Path, split: str, options: dict) -> dict:
    """Shards and index of `split`, resumed from its progress.json; returns the final progress."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    progress = _read_json(folder / "progress.json")
    if progress is None:
        progress = {"options": options, "source_rows": 0, "source_state": None, "dropped": {}}
        progress |= {"shards": [], "group_bytes": [], "seconds": 0.0, "complete": False}
    else:
        _check_options(progress["options"], options, folder / "progress.json")
    if not progress["complete"]:
        if progress["source_rows"]:
            log.info("%s: resuming after %d source rows", folder, progress["source_rows"])
        started, before = time.monotonic(), progress["seconds"]
        _convert(folder, split, options, progress, lambda: before + time.monotonic() - started)
        _write_index(folder, progress["shards"])
        progress |= {"complete": True, "seconds": round(before + time.monotonic() - started, 3)}
        _write_json(folder / "progress.json", progress)
    entry = _split_entry(progress)
    dropped = ", ".join(f"{n} {why}" for why, n in entry["dropped"].items()) or "none"
    log.info(
        "%s: kept %d of %d utterances (%.2f h) in %d shards; dropped: %s",
        *(split, entry["utterances"], entry["source_rows"], entry["hours"]),
        *(len(entry["shards"]), dropped),
    )
    return progress


def _convert(
    folder: Path, split: str, options: dict, progress: dict, clock: Callable[[], float]
) -> None:
    """Read the source from progress' resume point, writing a shard (and progress.json after it)
    whenever the audio reaches shard_mb. Updates `progress` in place; `clock()`: seconds spent on
    the split, earlier runs included."""
    source = None if options["source"] == HUB else Path(options["source"])
    rows = _resume(_open_split(source, options["subset"], split), progress)
    where = f"{options['source']} split {HUB_SPLITS[split]!r}"
    consumed, dropped = progress["source_rows"], Counter(progress["dropped"])
    pending: list[Utterance] = []
    pending_bytes, shard_bytes = 0, options["shard_mb"] * 1e6
    audio_s = sum(s["hours"] for s in progress["shards"]) * 3600
    total_h = HOURS[options["subset"]] if split == "train" else HOURS[split]

    def close_shard() -> None:
        progress["source_state"] = _state_of(rows)
        if pending:
            _write_shard(folder, split, pending, options["rows_per_group"], progress)
        progress.update(source_rows=consumed, dropped=dict(sorted(dropped.items())))
        progress["seconds"] = round(clock(), 3)
        _write_json(folder / "progress.json", progress)

    with LoopProgress(total_h, f"gigaspeech {options['subset']} {split}", unit="h") as bar:
        _advance(bar, 0.0, audio_s)
        for row in rows:
            if consumed == progress["source_rows"] and rows.column_names is None:
                _require(list(row), where)  # a source that does not know its columns up front
            consumed += 1
            kept = _guarded(row, source)
            if isinstance(kept, str):
                dropped[kept] += 1
                continue
            pending.append(kept)
            pending_bytes += len(kept[1])
            _advance(bar, audio_s, audio_s + kept[3])
            audio_s += kept[3]
            if pending_bytes >= shard_bytes:
                close_shard()
                pending, pending_bytes = [], 0
        if pending or consumed != progress["source_rows"]:
            close_shard()


def _advance(bar: LoopProgress, before_s: float, after_s: float) -> None:
    """Move the hours bar by the whole hours between two audio totals (never past its end: the
    figures are the dataset's, and a local copy may hold more)."""
    hours = int(after_s // 3600) - int(before_s // 3600)
    hours = min(hours, bar.total - bar.done)
    if hours > 0:
        bar.update(hours)


def _guarded(row: dict, source: Path | None) -> Utterance | str:
    """_utterance, but a row that breaks it (a time that is not a number...) is dropped."""
    try:
        return _utterance(row, source)
    except Exception as e:
        log.warning("dropped source row %r: %s: %s", row.get("segment_id"), type(e).__name__, e)
        return "malformed row"


def _utterance(row: dict, source: Path | None) -> Utterance | str:
    """The utterance of a source row, or why it is dropped."""
    raw = row["text"]  # a missing (None) transcript is empty, not the word "none"
    text = gigaspeech_train_text("" if raw is None else str(raw))
    if text is None:
        return "garbage tags"
    if not text:
        return "empty transcript"
    audio = _audio_bytes(row["audio"], source)
    try:
        info = soundfile.info(io.BytesIO(audio)) if audio else None
    except (RuntimeError, TypeError, ValueError):  # soundfile.LibsndfileError is a RuntimeError
        info = None
    if info is None or row["segment_id"] is None:
        return "unreadable audio" if info is None else "no segment id"
    begin, end = row.get("begin_time"), row.get("end_time")
    known = begin is not None and end is not None and end > begin
    return str(row["segment_id"]), audio, text, float(end - begin if known else info.duration)


def _audio_bytes(cell: Any, source: Path | None) -> bytes | None:
    """The encoded audio of an Audio(decode=False) cell: its bytes, else its file's bytes (a
    relative path is looked up next to a local source first)."""
    if isinstance(cell, bytes | bytearray):
        return bytes(cell)
    if not isinstance(cell, dict):
        return None
    if cell.get("bytes"):
        return cell["bytes"]
    if not cell.get("path"):
        return None
    candidates = [source / cell["path"]] if source is not None and source.is_dir() else []
    for path in [*candidates, Path(cell["path"])]:
        try:
            return path.read_bytes()
        except OSError:
            continue
    return None


# --- the source -------------------------------------------------------------------------------


def _open_split(source: Path | None, subset: str, split: str) -> Any:
    """The IterableDataset of `split` (ours: train/dev/test) from the hub or a local copy, its
    audio cast to undecoded bytes; a missing required column is a ValueError."""
    import datasets  # slow to import: only here

    rows = _open_source(source, subset, HUB_SPLITS[split])
    if rows.column_names is None:  # a streamed dataset that does not know its features
        return rows
    _require(rows.column_names, f"{HUB if source is None else source} split {HUB_SPLITS[split]!r}")
    return rows.cast_column("audio", datasets.Audio(decode=False))


def _open_source(source: Path | None, subset: str, name: str) -> Any:
    import datasets

    if source is None:
        try:
            return datasets.load_dataset(
                HUB, subset, split=name, streaming=True, token=os.environ.get("HF_TOKEN")
            )
        except Exception as e:
            raise RuntimeError(
                f"cannot open {HUB} (subset {subset}, split {name}) on the HuggingFace hub: "
                f"{type(e).__name__}: {e}. The dataset is gated: accept its terms on "
                f"https://huggingface.co/datasets/{HUB} and set HF_TOKEN to a token of that "
                "account, or pass --from PATH with a local copy (parquet files or a save_to_disk "
                "folder)"
            ) from e
    if not source.exists():
        raise FileNotFoundError(f"--from {source}: no such file or folder")
    if (source / "dataset_dict.json").exists() or (source / "state.json").exists():
        found = datasets.load_from_disk(str(source))
        if isinstance(found, datasets.Dataset):
            raise ValueError(
                f"--from {source} is one dataset without splits; save a DatasetDict with "
                "splits train, validation, test"
            )
        return _pick(found, source, name).to_iterable_dataset()
    found = datasets.load_dataset("parquet", data_dir=str(source), streaming=True)
    return _pick(found, source, name)


def _pick(found: Any, source: Path, name: str) -> Any:
    if name not in found:
        raise ValueError(f"--from {source} has splits {sorted(found)}, not {name!r}")
    return found[name]


def _resume(rows: Any, progress: dict) -> Any:
    """`rows` from progress' resume point: the dataset's own state when it was saved (whole
    source files are skipped unread), else by skipping the rows consumed."""
    if not progress["source_rows"]:
        return rows
    if progress["source_state"] is not None:
        try:
            rows.load_state_dict(progress["source_state"])
            return rows
        except Exception as e:  # another datasets version: skip row by row instead
            log.warning("cannot restore the source position (%s); skipping rows instead", e)
    return rows.skip(progress["source_rows"])


def _state_of(rows: Any) -> dict | None:
    try:
        state = rows.state_dict()
        json.dumps(state)
        return state
    except Exception:
        return None


def _require(columns: Sequence[str], where: str) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise ValueError(f"{where}: no column {missing[0]!r} (columns: {list(columns)})")


# --- writing ----------------------------------------------------------------------------------


def _write_shard(
    folder: Path, split: str, rows: list[Utterance], rows_per_group: int, progress: dict
) -> None:
    """Write the next shard of `progress` (sorted by duration, id) and record it there."""
    rows = sorted(rows, key=lambda r: (r[3], r[0]))
    ids, audio, texts, seconds = zip(*rows)
    table = pa.Table.from_arrays(
        [pa.array(ids), pa.array(audio, pa.binary()), pa.array(texts), pa.array(seconds)],
        schema=SHARD_SCHEMA,
    )
    name = f"shard-{len(progress['shards']):05d}.parquet"
    _write_parquet(
        folder / name,
        table,
        row_group_size=rows_per_group,
        compression="none",  # the audio is compressed already; bytes stay as in the source
        use_dictionary=False,
        write_statistics=["id", "duration"],  # not the audio: its min/max would be whole files
    )
    sizes = [len(a) for a in audio]
    groups = range(0, len(sizes), rows_per_group)
    progress["group_bytes"].append(max(sum(sizes[i : i + rows_per_group]) for i in groups))
    progress["shards"].append(
        {
            "file": f"{split}/{name}",
            "utterances": len(rows),
            "hours": sum(seconds) / 3600,
            "bytes": (folder / name).stat().st_size,
            "sha256": _sha256(folder / name),
        }
    )


def _write_index(folder: Path, shards: list[dict]) -> None:
    """index.parquet from the shards, one shard at a time (XL's index is about 1 GB), in row
    groups of INDEX_GROUP_ROWS: a reader keeps two groups of ids and texts, not the whole index."""
    tmp = folder / "index.parquet.tmp"
    with pq.ParquetWriter(str(tmp), INDEX_SCHEMA) as writer:
        for number, shard in enumerate(shards):
            part = pq.read_table(folder.parent / shard["file"], columns=["id", "duration", "text"])
            n = part.num_rows
            shard_col = pa.array(np.full(n, number, np.int32))
            row_col = pa.array(np.arange(n, dtype=np.int32))
            arrays = [part["id"], part["duration"], shard_col, row_col, part["text"]]
            table = pa.Table.from_arrays(arrays, schema=INDEX_SCHEMA)
            writer.write_table(table, row_group_size=INDEX_GROUP_ROWS)
    _replace(tmp, folder / "index.parquet")


def _write_parquet(path: Path, table: pa.Table, **options: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, str(tmp), **options)
    _replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    _replace(tmp, path)


def _replace(tmp: Path, path: Path) -> None:
    """Make the written `tmp` durable, then move it to `path` in one step."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


# --- small things -----------------------------------------------------------------------------


def _split_entry(progress: dict) -> dict:
    shards = progress["shards"]
    return {
        "utterances": sum(s["utterances"] for s in shards),
        "hours": sum(s["hours"] for s in shards),
        "dropped": progress["dropped"],
        "source_rows": progress["source_rows"],
        "shards": shards,
    }


def _check_arguments(
    subset: str, splits: Sequence[str], shard_mb: float, rows_per_group: int
) -> None:
    if subset not in SUBSETS:
        raise ValueError(f"subset {subset!r} is not one of {', '.join(SUBSETS)}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits {list(splits)}: each must be one of {', '.join(SPLITS)}")
    if not 0 < shard_mb <= MAX_SHARD_MB:
        raise ValueError(f"shard_mb {shard_mb}: must be > 0 and <= {MAX_SHARD_MB}")
    if rows_per_group < 1:
        raise ValueError(f"rows_per_group {rows_per_group}: must be >= 1")


def _check_options(found: dict, wanted: dict, path: Path) -> None:
    differ = [f"{k} {found.get(k)!r} there, {wanted[k]!r} now" for k in OPTIONS
              if found.get(k) != wanted[k]]  # fmt: skip
    if differ:
        raise ValueError(
            f"{path} was made with other options ({'; '.join(differ)}): use another --out, or "
            f"delete {path.parent if path.name == 'prepared.json' else path.parent.parent} "
            "to start over"
        )


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmu_asr.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    giga = commands.add_parser("gigaspeech", help="prepare GigaSpeech into DIR")
    giga.add_argument("--subset", required=True, choices=SUBSETS)
    giga.add_argument("--out", required=True, type=Path, metavar="DIR")
    giga.add_argument(
        "--from", dest="source", metavar="PATH", help="a local copy (default: the hub, HF_TOKEN)"
    )
    giga.add_argument("--splits", default=",".join(SPLITS), help="default: %(default)s")
    giga.add_argument("--shard-mb", type=float, default=256.0, help="default: %(default)s")
    giga.add_argument("--rows-per-group", type=int, default=32, help="default: %(default)s")
    check = commands.add_parser("verify", help="re-hash DIR's shards against prepared.json")
    check.add_argument("out", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "verify":
        problems = verify(args.out)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{args.out}: {len(problems) or 'no'} problems")
        return 1 if problems else 0
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        manifest = prepare(
            args.subset, args.out, args.source, splits, args.shard_mb, args.rows_per_group
        )
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['utterances']} utterances, {info['hours']:.2f} h")
    print(f"{args.out / 'prepared.json'}: complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
