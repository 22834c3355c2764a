"""Speech data: the `data` config group and where utterances come from (the demo corpus, a
JSON-lines manifest, a HF dataset). Decoding and checks live in `lmu_asr.speech_dataset`,
batching in `lmu_asr.batching`; this module re-exports both, so callers import from here.

A manifest is JSON lines `{"audio": path relative to the manifest or absolute, "text": ...}`;
optional keys: "id", "duration" (seconds), others ignored.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import soundfile

from lmu_asr.batching import Batch, BucketBatchSampler, SkipCounter, collate, make_loader
from lmu_asr.features import num_frames
from lmu_asr.hf import HFAudio, read_hf
from lmu_asr.prepared import PreparedSplit, ShardAudio
from lmu_asr.speech_dataset import SKIP_REASONS, Item, Skipped, SpeechDataset, encoder_frames
from lmu_asr.text import gigaspeech_train_text, normalize
from lmu_asr.wordnet import UNSEEN_POOL

__all__ = ["Batch", "BucketBatchSampler", "DataConfig", "HFAudio", "Item", "SKIP_REASONS"]
__all__ += ["SkipCounter", "Skipped", "SpeechDataset", "Utterance", "collate", "encoder_frames"]
__all__ += ["has_unseen", "load_split", "make_loader", "num_frames", "read_manifest"]

log = logging.getLogger(__name__)
SOURCES = ("demo", "manifest", "hf", "prepared")
TEXT_RULES: dict[str, Callable[[str], str | None]] = {
    "plain": normalize,
    "gigaspeech": gigaspeech_train_text,
}
SPLITS = ("train", "dev", "test", "unseen")  # unseen: the demo corpus's held-out voices


@dataclass
class DataConfig:
    source: str = "demo"  # demo | manifest | hf | prepared
    manifest: str | None = None  # train manifest; for evaluation, the manifest to score
    dev_manifest: str | None = None
    test_manifest: str | None = None
    # demo: the built-in synthetic corpus (lmu_asr.corpus)
    corpus_train: int = 2000
    corpus_dev: int = 200
    corpus_test: int = 200
    corpus_unseen: int = 200  # utterances of voices never trained on (lmu_asr.corpus); 0 = none
    corpus_seed: int = 0
    cache_dir: str | None = None  # default $LMU_ASR_CACHE or ~/.cache/lmu_asr
    # hf: a hub dataset by name, or a local save_to_disk folder / parquet / arrow file(s).
    # "{split}" in hf_path is replaced by the split name (hf_train_split, ...).
    hf_name: str | None = None
    hf_config: str | None = None
    hf_path: str | None = None
    hf_train_split: str = "train"
    hf_dev_split: str = "validation"
    hf_test_split: str = "test"
    audio_column: str = "audio"
    text_column: str = "text"
    id_column: str | None = "segment_id"  # None: ids are row numbers
    streaming: bool = False
    # prepared: shards written by `python -m lmu_asr.prepare` (lmu_asr.prepared)
    dir: str | None = None
    cache_groups: int = 8  # row groups of audio held per process (data worker)
    text_rules: str = "plain"  # plain | gigaspeech
    # loader
    max_frames: int = 20000  # 10-ms feature frames per batch, padding included
    max_duration: float = 20.0  # seconds; longer utterances are skipped
    num_workers: int = 2
    strict: bool = False  # raise on a bad utterance instead of skipping it
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"data.{name}={getattr(self, name)!r}: {why}")

        if self.source not in SOURCES:
            raise bad("source", f"must be one of {SOURCES}")
        if self.text_rules not in TEXT_RULES:
            raise bad("text_rules", f"must be one of {tuple(TEXT_RULES)}")
        if self.source == "manifest" and not self.manifest:
            raise bad("manifest", "data.source=manifest needs a manifest file")
        if self.source == "hf" and bool(self.hf_name) == bool(self.hf_path):
            raise bad(
                "hf_name",
                f"data.source=hf needs exactly one of hf_name, hf_path (hf_path={self.hf_path!r})",
            )
        if self.source == "prepared" and not self.dir:
            raise bad("dir", "data.source=prepared needs the folder written by lmu_asr.prepare")
        if self.cache_groups < 1:
            raise bad("cache_groups", "must be >= 1")
        if self.streaming and not self.hf_name:
            raise bad("streaming", "streaming needs data.hf_name (a hub dataset)")
        for name in ("corpus_train", "corpus_dev", "corpus_test", "corpus_unseen", "num_workers"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.corpus_unseen > UNSEEN_POOL:
            raise bad("corpus_unseen", f"must be <= {UNSEEN_POOL} (sentences kept for it)")
        if self.sample_rate <= 0 or self.sample_rate % 100:
            raise bad("sample_rate", "must be a positive multiple of 100 (10-ms frames)")
        if self.max_duration <= 0:
            raise bad("max_duration", "must be > 0")
        if self.max_frames < num_frames(self.max_duration):
            raise bad(
                "max_frames",
                f"is smaller than one utterance of max_duration="
                f"{self.max_duration} s ({num_frames(self.max_duration)} frames)",
            )


@dataclass
class Utterance:
    id: str
    audio: str | bytes | HFAudio | ShardAudio  # file path, encoded bytes, an HF or shard row
    text: str  # already normalised
    duration: float  # seconds; 0.0 when unknown (unreadable audio: the dataset skips it)


def load_split(cfg: DataConfig, split: str) -> Sequence[Utterance]:
    """The utterances of `split` ("train", "dev", "test"; "unseen" for the demo corpus) from the
    source in `cfg`: a list, or for prepared shards a `PreparedSplit` that reads them on demand."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "unseen":
        if not has_unseen(cfg):
            why = "is 0" if cfg.source == "demo" else f"is only for data.source=demo ({cfg.source})"
            raise ValueError(f"the unseen-voices split {why}: set data.corpus_unseen > 0")
        from lmu_asr.corpus import build_unseen

        path = build_unseen(cfg.corpus_unseen, seed=cfg.corpus_seed, cache_dir=cfg.cache_dir)
        return read_manifest(path, TEXT_RULES[cfg.text_rules], cfg.strict)
    if cfg.source == "prepared":
        return PreparedSplit(cfg.dir, split, cfg.cache_groups)
    rule = TEXT_RULES[cfg.text_rules]
    if cfg.source == "demo":
        from lmu_asr.corpus import build_corpus

        sizes = (cfg.corpus_train, cfg.corpus_dev, cfg.corpus_test)
        paths = build_corpus(*sizes, seed=cfg.corpus_seed, cache_dir=cfg.cache_dir)
        return read_manifest(paths[split], rule, cfg.strict)
    if cfg.source == "manifest":
        name = {"train": "manifest", "dev": "dev_manifest", "test": "test_manifest"}[split]
        if getattr(cfg, name) is None:
            raise ValueError(f"data.{name} is not set: no manifest for the {split} split")
        return read_manifest(getattr(cfg, name), rule, cfg.strict)
    hf_split = getattr(cfg, f"hf_{split}_split")
    where = cfg.hf_path or cfg.hf_name
    return [
        Utterance(
            r.id, r.audio, r.text, r.duration or _duration(r.audio, where if cfg.strict else None)
        )
        for r in read_hf(cfg, hf_split, rule)
    ]


def has_unseen(cfg: DataConfig) -> bool:
    """Whether the source has an unseen-voices split (the demo corpus with corpus_unseen > 0)."""
    return cfg.source == "demo" and cfg.corpus_unseen > 0


def read_manifest(
    path: str | Path, rule: Callable[[str], str | None] = normalize, strict: bool = False
) -> list[Utterance]:
    """Utterances of a JSON-lines manifest; `rule` normalises text (None drops the utterance).

    Audio paths may lie outside the manifest's folder ("../audio/x.wav", absolute paths): shared
    datasets often keep manifests apart from the audio. Relative ones that climb out with ".."
    get one warning, as they break when the manifest alone is copied elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (or is not a file)")
    utts, dropped, outside = [], 0, []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                row = _manifest_row(line, f"{path}:{lineno}")
                text = rule(row["text"])
                if text is None:
                    dropped += 1
                    continue
                audio = str(path.parent / row["audio"])  # an absolute path stays as it is
                if ".." in Path(row["audio"]).parts and not Path(row["audio"]).is_absolute():
                    outside.append(f"{row['audio']} -> {os.path.normpath(audio)}")
                duration = row.get("duration")
                if duration is None:
                    duration = _duration(audio, f"{path}:{lineno}" if strict else None)
                utt_id = str(row.get("id", row["audio"]))
                utts.append(Utterance(utt_id, audio, text, float(duration)))
    if dropped:
        log.info("%s: dropped %d utterances with garbage tags", path, dropped)
    if outside:
        log.warning(
            "%s: %d audio paths climb out of the manifest's folder, resolved from it (first: %s);"
            " keep the audio next to the manifest if you move it",
            *(path, len(outside), outside[0]),
        )
    return utts


def _manifest_row(line: str, where: str) -> dict:
    """One manifest line -> its checked JSON object; ValueError naming file:line otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        if not line.endswith("\n"):  # only the last line can lack its newline
            raise ValueError(
                f"{where}: the last line is cut short ({err}): the manifest was not written to "
                "the end; write it again or delete that line"
            ) from None
        raise ValueError(f"{where}: not valid JSON ({err}); fix or delete that line") from None
    for key in ("audio", "text"):
        if not isinstance(row, dict) or key not in row:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(row[key], str) or (key == "audio" and not row[key]):
            kind = "a non-empty string" if key == "audio" else "a string"
            raise ValueError(f"{where}: {key!r} must be {kind}, got {row[key]!r}")
    duration = row.get("duration")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration < 0
    ):
        raise ValueError(f"{where}: duration must be a number of seconds, got {duration!r}")
    return row


def _duration(audio: str | bytes | HFAudio, strict_where: str | None = None) -> float:
    """Seconds of audio from its header; 0.0 if unreadable, or ValueError when `strict_where`."""
    try:
        source = audio.load() if isinstance(audio, HFAudio) else audio
        return soundfile.info(io.BytesIO(source) if isinstance(source, bytes) else source).duration
    except Exception as err:
        if strict_where:
            shown = "<bytes>" if isinstance(audio, bytes) else repr(audio)
            raise ValueError(f"{strict_where}: cannot read audio {shown}: {err}") from err
        return 0.0  # SpeechDataset reports it as unreadable
