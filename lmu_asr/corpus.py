"""The built-in corpus: WordNet example sentences spoken by free TTS voices, built once and cached.

`python -m lmu_asr.corpus --train 2000 --dev 200 --test 200 [--unseen 200]` prints the manifest
paths. The corpus folder holds `{train,dev,test}.jsonl`, `wav/<split>/<id>.wav` (16 kHz mono
16-bit) and the WordNet licence. Voices reserved for held-out evaluation (flite slt, festival's
HTS slt voice) are refused by `check_voice`; they speak only the `unseen` split, which is cached
apart (its own folder, built when first asked for) from sentences no other split uses.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile

from lmu_asr.progress import LoopProgress
from lmu_asr.wordnet import split_sentences, wordnet_licence, wordnet_sentences

CORPUS_VERSION = 4  # bump whenever the audio or text of a corpus changes
UNSEEN_VERSION = 1  # the same for the unseen-voices split (cached apart)
DEBIAN_PACKAGES = "espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k sox wordnet-base"
DEBIAN_PACKAGES += " festvox-us-slt-hts"  # the held-out festival voice (unseen split only)
SPLITS = ("train", "dev", "test")

ESPEAK_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan")
ESPEAK_ACCENTS += ("en-gb-x-gbcwmd", "en-029", "en-us-nyc")
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 9)) + tuple(f"f{i}" for i in range(1, 6))
ESPEAK_VARIANTS += ("klatt", "klatt2", "klatt3", "klatt4", "adam", "Andy", "david", "edward")
ESPEAK_VARIANTS += ("john", "linda", "max", "paul", "robert", "steph", "travis", "victor")
TRAINING_VOICES = {
    "espeak-ng": tuple(f"{a}+{v}" for a in ESPEAK_ACCENTS for v in ESPEAK_VARIANTS),
    "flite": ("kal16", "awb", "rms"),
    "festival": ("kal_diphone", "ked_diphone"),
}
# Only for the unseen split: voices no model is trained on.
HELD_OUT_VOICES = {"flite": ("slt",), "festival": ("cmu_us_slt_arctic_hts",)}
HELD_OUT_WEIGHTS = {"flite": 0.5, "festival": 0.5}
# Share of utterances per engine (festival has only 2 voices, flite 3, espeak-ng ~250).
ENGINE_WEIGHTS = {"espeak-ng": 0.5, "flite": 0.4, "festival": 0.1}
DEFAULT_ENGINES = ("espeak-ng", "flite", "festival")
_ENGINE_BINARY = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival"}
_SOX_EFFECTS = "norm -1 silence 1 0.02 0.5% reverse silence 1 0.02 0.5% reverse pad 0.1 0.1"


def check_voice(engine: str, voice: str) -> None:
    """Raise ValueError unless `voice` of `engine` is one of the voices allowed for training."""
    if "slt" in voice or "hts" in voice:
        raise ValueError(f"voice {engine}:{voice} is reserved for held-out evaluation")
    if voice not in TRAINING_VOICES.get(engine, ()):
        raise ValueError(f"voice {engine}:{voice} is not a training voice (see TRAINING_VOICES)")


# --- synthesis -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Utt:
    """One utterance to speak: everything random about it is drawn from (seed, split, index)."""

    id: str
    split: str
    text: str
    engine: str
    voice: str
    rate: float  # espeak-ng words per minute; flite/festival duration stretch
    pitch: int  # espeak-ng pitch 0-99; flite mean f0 in Hz (0: the voice's own); festival unused
    shift: int = 0  # cents that sox moves pitch and formants together: a voice of another size


def _plan(split: str, index: int, text: str, seed: int, engines: list[str]) -> _Utt:
    rng = random.Random(f"lmu_asr-corpus:{seed}:{split}:{index}")
    if split == "unseen":
        engine = rng.choices(list(HELD_OUT_VOICES), weights=list(HELD_OUT_WEIGHTS.values()))[0]
        voice, rate = HELD_OUT_VOICES[engine][0], round(rng.uniform(1.0, 1.2), 3)
        return _Utt(f"{split}-{index:06d}", split, text, engine, voice, rate, 0)  # own pitch
    engine = rng.choices(engines, weights=[ENGINE_WEIGHTS[e] for e in engines])[0]
    voice = rng.choice(TRAINING_VOICES[engine])
    check_voice(engine, voice)
    # Speaking rates are capped so that even 4x-subsampled CTC has ~20% more frames than it needs.
    if engine == "espeak-ng":
        rate, pitch = rng.randint(125, 185), rng.randint(15, 85)
    elif engine == "flite":
        rate, pitch = round(rng.uniform(1.0, 1.3), 3), rng.randint(80, 190)
    else:
        rate, pitch = round(rng.uniform(1.0, 1.2), 3), 0
    # Half the utterances move pitch and formants together, from 16% lower to 33% higher: the
    # training voices are mostly male, each of one size; a new voice is often of another size.
    shift = rng.randint(-300, 500) if rng.random() < 0.5 else 0
    return _Utt(f"{split}-{index:06d}", split, text, engine, voice, rate, pitch, shift)


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:3])} ... failed ({result.returncode}): {result.stderr.strip()}\n"
            f"(are the Debian packages installed? {DEBIAN_PACKAGES})"
        )


def _festival(root: Path, utts: list[_Utt]) -> None:
    """Speak `utts` with one festival process: its start-up (~0.25 s) dwarfs a diphone voice."""
    script = root / f"{utts[0].id}.scm"
    lines = []
    for utt in utts:  # texts are [a-z' ]: nothing to escape
        lines.append(f"(voice_{utt.voice})(Parameter.set 'Duration_Stretch {utt.rate})")
        wave = f"{root / utt.id}.raw.wav"
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{utt.text}")) "{wave}" \'riff)')
    script.write_text("\n".join(lines) + "\n")
    _run(["festival", "--batch", str(script)])
    script.unlink()


def _speak(root: Path, utt: _Utt) -> dict:
    """Make root/wav/<split>/<id>.wav (16 kHz mono 16-bit, trimmed) and return its manifest row."""
    raw = root / f"{utt.id}.raw.wav"
    if utt.engine != "festival":  # festival utterances were spoken in batches beforehand
        text_file = root / f"{utt.id}.txt"
        text_file.write_text(utt.text)
        if utt.engine == "espeak-ng":
            cmd = ["espeak-ng", "-v", utt.voice, "-s", str(utt.rate), "-p", str(utt.pitch)]
            cmd += ["-f", str(text_file), "-w", str(raw)]
        else:
            cmd = ["flite", "-voice", utt.voice, "--setf", f"duration_stretch={utt.rate}"]
            cmd += ["--setf", f"int_f0_target_mean={utt.pitch}"] if utt.pitch else []
            cmd += ["-f", str(text_file), "-o", str(raw)]
        _run(cmd)
        text_file.unlink()
    audio = Path("wav") / utt.split / f"{utt.id}.wav"
    sox = ["sox", "-R", str(raw), "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer"]
    shift = ["pitch", str(utt.shift)] if utt.shift else []
    _run(sox + [str(root / audio)] + shift + _SOX_EFFECTS.split())
    raw.unlink()
    duration = round(soundfile.info(str(root / audio)).duration, 4)
    speaker = f"{utt.engine}:{utt.voice}"
    return {
        "id": utt.id,
        "audio": str(audio),
        "text": utt.text,
        "duration": duration,
        "speaker": speaker,
    }


def _check_binaries(engines: Sequence[str]) -> None:
    for binary in ["sox", *(_ENGINE_BINARY[e] for e in engines)]:
        if shutil.which(binary) is None:
            raise RuntimeError(
                f"corpus: '{binary}' not found; install the Debian packages: "
                f"apt-get install -y --no-install-recommends {DEBIAN_PACKAGES}"
            )


def _build(root: Path, sizes: dict[str, int], seed: int, engines: list, jobs: int, progress: bool):
    """Speak the splits named in `sizes` ({"train", "dev", "test"} or {"unseen"}) into `root`."""
    n = {s: sizes.get(s, 0) for s in (*SPLITS, "unseen")}
    texts = split_sentences(wordnet_sentences(), *(n[s] for s in SPLITS), seed, n["unseen"])
    utts = [_plan(s, i, text, seed, engines) for s in sizes for i, text in enumerate(texts[s])]
    for split in sizes:
        (root / "wav" / split).mkdir(parents=True)
    (root / "LICENSE-WordNet.txt").write_text(wordnet_licence())
    festival = [utt for utt in utts if utt.engine == "festival"]
    rows: dict[str, list] = {split: [] for split in sizes}
    with (
        ThreadPoolExecutor(jobs) as pool,
        LoopProgress(len(utts), "building corpus", "utt", enabled=progress) as bar,
    ):
        list(
            pool.map(lambda k: _festival(root, festival[k::jobs]), range(min(jobs, len(festival))))
        )
        futures = [pool.submit(_speak, root, utt) for utt in utts]
        try:
            for utt, future in zip(utts, futures, strict=True):
                rows[utt.split].append(future.result())
                bar.update()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    for split in sizes:
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows[split])


def default_cache_dir() -> Path:
    return Path(os.environ.get("LMU_ASR_CACHE", Path.home() / ".cache" / "lmu_asr"))


def corpus_dir(
    n_train: int,
    n_dev: int,
    n_test: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    engines: Sequence[str] | None = None,
) -> tuple[Path, dict]:
    """Where build_corpus keeps this corpus (it exists once built), and what its key hashes."""
    engines = sorted(set(engines or DEFAULT_ENGINES))
    for engine in engines:
        if engine not in TRAINING_VOICES:
            raise ValueError(f"engines: unknown engine {engine!r} (known: {list(TRAINING_VOICES)})")
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for split, n in sizes.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    key_fields = dict(version=CORPUS_VERSION, seed=seed, engines=engines, **sizes)
    return _folder("corpus", key_fields, cache_dir), key_fields


def _folder(prefix: str, key_fields: dict, cache_dir: str | Path | None) -> Path:
    """The cache folder named by `prefix` and a hash of `key_fields`."""
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"{prefix}-{key}"


def build_corpus(
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 200,
    seed: int = 0,
    jobs: int | None = None,
    cache_dir: str | Path | None = None,
    engines: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Build (or find in the cache) the synthetic corpus; return {"train","dev","test"} manifests.

    The cache key hashes every argument that changes the output (not `jobs` or `progress`).
    Concurrent callers (DDP ranks, array jobs) wait on a file lock; one of them builds.
    """
    final, key_fields = corpus_dir(n_train, n_dev, n_test, seed, cache_dir, engines)
    sizes = {s: key_fields[s] for s in SPLITS}
    return _cached(final, key_fields, sizes, key_fields["engines"], jobs, progress)


def unseen_dir(n: int, seed: int = 0, cache_dir: str | Path | None = None) -> tuple[Path, dict]:
    """Where build_unseen keeps the unseen-voices split, and what its key hashes."""
    if n < 0:
        raise ValueError(f"n_unseen must be >= 0, got {n}")
    key_fields = dict(version=UNSEEN_VERSION, seed=seed, unseen=n, voices=HELD_OUT_VOICES)
    return _folder("unseen", key_fields, cache_dir), key_fields


def build_unseen(
    n: int,
    seed: int = 0,
    jobs: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Build (or find in the cache) the unseen-voices split of the corpus with seed `seed`: `n`
    utterances spoken only by HELD_OUT_VOICES, from WordNet sentences that no train, dev or test
    split of that seed uses. Returns its manifest."""
    final, key_fields = unseen_dir(n, seed, cache_dir)
    engines = list(HELD_OUT_VOICES)
    return _cached(final, key_fields, {"unseen": n}, engines, jobs, progress)["unseen"]


def _cached(final: Path, key_fields: dict, sizes: dict, engines: list, jobs, progress: bool):
    """{split: manifest} of the corpus folder `final`, built there once (under a file lock)."""
    cache, key = final.parent, final.name
    paths = {split: final / f"{split}.jsonl" for split in sizes}
    if final.is_dir():
        return _checked(final, paths)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f"{key}.lock", "w")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise CorpusError(
            f"corpus cache {cache} is not writable ({e.strerror}): cannot build the corpus "
            "there; set LMU_ASR_CACHE (or data.cache_dir) to a writable folder"
        ) from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # another process built it while we waited
            return _checked(final, paths)
        _check_binaries(engines)
        for stale in cache.glob(f"{key}.tmp*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp", dir=cache))
        try:
            jobs = jobs or len(os.sched_getaffinity(0))
            if progress:
                print(f"building the corpus once, in {final}", file=sys.stderr, flush=True)
            _build(tmp, sizes, key_fields["seed"], engines, jobs, progress)
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in _entries(tmp)}
            info = key_fields | {"files": files}
            (tmp / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


class CorpusError(RuntimeError):
    """The corpus cache cannot be written, or an entry in it is missing or damaged."""


def _entries(folder: Path) -> list[Path]:
    return [*sorted(folder.glob("*.jsonl")), *sorted(folder.glob("wav/*/*.wav"))]


def _checked(final: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """`paths` once every file of the cached corpus has the size it was built with (a stat per
    file: cheap, and enough to catch a truncated wav or manifest). Corpora built before the
    sizes were recorded are not checked."""
    try:
        files = json.loads((final / "corpus.json").read_text()).get("files", {})
    except (OSError, ValueError, AttributeError) as e:
        raise CorpusError(
            f"corpus cache entry {final / 'corpus.json'} is unreadable ({e}); delete {final} "
            "and run again to rebuild it"
        ) from e
    for name, size in files.items():
        path = final / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes, {size} expected"
            raise CorpusError(
                f"corpus cache entry {path} is truncated or changed ({found}); delete {final} "
                "and run again to rebuild it (once no other job is using it)"
            )
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmu_asr.corpus", description=__doc__)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--dev", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--unseen", type=int, default=0, help="unseen-voices utterances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=None, help="default: usable CPU cores")
    parser.add_argument("--cache-dir", default=None, help="default: $LMU_ASR_CACHE or ~/.cache")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    paths = build_corpus(
        args.train,
        args.dev,
        args.test,
        args.seed,
        args.jobs,
        args.cache_dir,
        args.engines.split(","),
        not args.no_progress,
    )
    if args.unseen:
        paths["unseen"] = build_unseen(
            args.unseen, args.seed, args.jobs, args.cache_dir, not args.no_progress
        )
    print(json.dumps({split: str(path) for split, path in paths.items()}, indent=1))


if __name__ == "__main__":
    main()
