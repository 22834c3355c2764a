"""The bad-input matrix: every user-facing surface (launch overrides, tracking URI, manifests,
audio, transcripts, HF rows, checkpoints, evaluate and transcribe arguments) given a bad input
answers with a clear error or a counted skip, whose message holds the key words of its row.
README's "Reliability" section lists the rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from lmu_asr import evaluate, transcribe
from lmu_asr.checkpoint import CheckpointError
from lmu_asr.data import DataConfig, SpeechDataset, Utterance, load_split, read_manifest
from lmu_asr.evaluate import run_cli
from lmu_asr.launch import compose_config
from tests.test_evaluate import make_checkpoint, write_wav

# what a clear error may be: launch prints Hydra's and ours; the CLIs exit with one line
ERRORS = (ValueError, OSError, CheckpointError, HydraException, OmegaConfBaseException, SystemExit)


@dataclass(frozen=True)
class Row:
    surface: str
    input: str
    outcome: str  # "error": one line naming the problem | "skip <reason>": counted, not fatal
    words: tuple[str, ...]  # key words of the message
    run: Callable[[Path], object]  # given the work folder; raises, exits, or returns a Skipped


def manifest(root: Path, text: str, name: str = "m.jsonl") -> Path:
    (root / name).write_text(text)
    return root / name


def line(**row) -> str:
    return json.dumps(row) + "\n"


def utt(root: Path, **kw) -> object:
    """One utterance through the dataset (what training and evaluation load): an Item or a
    Skipped; strict mode's message is checked by the skip rows too."""
    u = Utterance(**({"id": "u", "audio": str(root / "ok.wav"), "text": "a", "duration": 1.0} | kw))
    item = SpeechDataset([u], max_duration=2.0)[0]
    with pytest.raises(ValueError) as err:
        SpeechDataset([u], max_duration=2.0, strict=True)[0]
    return item, str(err.value)


def evaluate_cli(root: Path, *argv: str, data: str | None = "ok.jsonl") -> None:
    args = [f"checkpoint={root / 'run'}", "data.num_workers=0"]
    args += ["data=manifest", f"data.manifest={root / data}"] if data else []
    run_cli(lambda: evaluate.main(args + list(argv)))


def transcribe_cli(root: Path, *argv: str) -> None:
    run_cli(lambda: transcribe.main([f"checkpoint={root / 'run'}", *argv]))


def hf_rows(root: Path, text_column: str = "text") -> object:
    """Row 1 of a local HF dataset (a save_to_disk folder: no HF cache) whose text is null."""
    cfg = DataConfig(source="hf", hf_path=str(root / "hf"), id_column=None, text_column=text_column)
    return SpeechDataset(load_split(cfg, "train"))[1], ""


def compose(*overrides: str) -> Callable[[Path], object]:
    return lambda r: compose_config(list(overrides))


def read(text: str) -> Callable[[Path], object]:
    return lambda r: read_manifest(manifest(r, text))


OK = line(audio="ok.wav", text="a")
ROWS = [
    # launch overrides (composed as `launch` composes them, before anything starts)
    Row("launch", "trainer.max_steps=-1", "error", ("trainer.max_steps must be >= 1", "-1"),
        compose("trainer.max_steps=-1")),
    Row("launch", "model=lmu_huge (no such preset)", "error", ("model/lmu_huge",),
        compose("model=lmu_huge")),
    Row("launch", "data.nope=1 (a typo)", "error", ("Could not override 'data.nope'",),
        compose("data.nope=1")),
    Row("launch", "data=manifest without data.manifest", "error",
        ("data.source=manifest needs a manifest file",), compose("data=manifest")),
    Row("launch", "trainer.device=tpu", "error", ("trainer.device must be one of", "'tpu'"),
        compose("trainer.device=tpu")),
    Row("launch", "data.max_duration=0", "error", ("data.max_duration=0.0: must be > 0",),
        compose("data.max_duration=0")),
    # tracking URI
    Row("tracking", "tracking.uri=ftp://host/x", "error",
        ("tracking.uri='ftp://host/x' is not an MLflow tracking URI", "http(s)://HOST:PORT"),
        compose("tracking.uri=ftp://host/x")),
    Row("tracking", "tracking.uri=http:// (no host)", "error", ("not an MLflow tracking URI",),
        compose("tracking.uri=http://")),
    # manifests
    Row("manifest", "a manifest that does not exist", "error",
        ("manifest", "none.jsonl", "does not exist"), lambda r: read_manifest(r / "none.jsonl")),
    Row("manifest", "last line cut short (writer killed)", "error",
        ("m.jsonl:2: the last line is cut short", "write it again or delete that line"),
        read(OK + '{"audio": "ok.w')),
    Row("manifest", "a line that is not JSON", "error",
        ("m.jsonl:1: not valid JSON", "fix or delete that line"), read("{oops\n" + OK)),
    Row("manifest", 'a row without "text"', "error", ("m.jsonl:1: missing key 'text'",),
        read(line(audio="ok.wav"))),
    Row("manifest", '"text": null', "error", ("m.jsonl:1: 'text' must be a string, got None",),
        read(line(audio="ok.wav", text=None))),
    Row("manifest", '"audio": 7', "error", ("m.jsonl:1: 'audio' must be a non-empty string",),
        read(line(audio=7, text="a"))),
    Row("manifest", '"duration": "long"', "error", ("m.jsonl:1: duration must be a number",),
        read(line(audio="ok.wav", text="a", duration="long"))),
    Row("manifest", "split=dev without data.dev_manifest", "error",
        ("data.dev_manifest is not set",),
        lambda r: load_split(DataConfig(source="manifest", manifest=str(r / "ok.jsonl")), "dev")),
    # audio (training skips and counts these; strict mode and evaluation name them)
    Row("audio", "a file that does not exist", "skip unreadable audio",
        ("gone.wav: no such file",), lambda r: utt(r, audio=str(r / "gone.wav"))),
    Row("audio", "a file that is not audio", "skip unreadable audio",
        ("cannot read audio", "junk.wav"), lambda r: utt(r, audio=str(r / "junk.wav"))),
    Row("audio", "a float WAV with NaN samples", "skip unreadable audio",
        ("nan.wav", "160 samples are NaN or infinite"), lambda r: utt(r, audio=str(r / "nan.wav"))),
    Row("audio", "a file with no samples", "skip empty audio", ("the audio has no samples",),
        lambda r: utt(r, audio=str(r / "empty.wav"), duration=0.0)),
    Row("audio", "longer than data.max_duration", "skip too long",
        ("3.00 s > max_duration 2.0 s",), lambda r: utt(r, audio=str(r / "long.wav"), duration=0)),
    Row("audio", "changed since the manifest (1 s declared, 1.5 s now)", "skip duration mismatch",
        ("the manifest says 1.00 s, the audio has 1.50 s", "restore the file or fix its duration"),
        lambda r: utt(r, audio=str(r / "changed.wav"), duration=1.0)),
    # transcripts
    Row("transcript", "empty after normalisation", "skip empty transcript",
        ("transcript is empty",), lambda r: utt(r, text=" ")),
    Row("transcript", "characters outside the alphabet", "skip out-of-alphabet", ("'!'",),
        lambda r: utt(r, text="hi!")),
    Row("transcript", "more letters than the audio has frames", "skip ctc infeasible",
        ("CTC frames needed",),
        lambda r: utt(r, text="a" * 60, audio=str(r / "short.wav"), duration=0.3)),
    # HF rows
    Row("hf", "a row whose transcript is null", "skip empty transcript", (), hf_rows),
    Row("hf", "data.text_column=sentence (no such column)", "error",
        ("no column 'sentence'", "columns:"), lambda r: hf_rows(r, text_column="sentence")),
    # checkpoints
    Row("checkpoint", "a path with no checkpoint", "error", ("no complete checkpoint at", "nope"),
        lambda r: evaluate_cli(r, f"checkpoint={r / 'nope'}")),
    Row("checkpoint", "a truncated model.pt", "error", ("model.pt",),
        lambda r: transcribe_cli(r, f"checkpoint={r / 'broken'}", f"audio={r / 'ok.wav'}")),
    # evaluate arguments
    Row("evaluate", "a manifest whose audio paths are all wrong", "error",
        ("nothing to score", "3 of 3 utterances not scored: unreadable audio 3", "first: x0.wav ("),
        lambda r: evaluate_cli(r, "allow_skips=true", data="wrong.jsonl")),
    Row("evaluate", "one bad utterance of two", "error",
        ("1 of 2 utterances not scored: unreadable audio 1", "allow_skips=true"),
        lambda r: evaluate_cli(r, data="half.jsonl")),
    Row("evaluate", "allow_skips=maybe", "error", ("allow_skips must be one of", "'maybe'"),
        lambda r: evaluate_cli(r, "allow_skips=maybe")),
    Row("evaluate", "beam.size=4 (unknown option)", "error",
        ("bad beam option", "'size'", "beam.beam_size"), lambda r: evaluate_cli(r, "beam.size=4")),
    Row("evaluate", "decoder=viterbi", "error", ("decoder must be one of ['greedy', 'beam']",),
        lambda r: evaluate_cli(r, "decoder=viterbi")),
    Row("evaluate", "split=validation", "error", ("split must be one of", "'validation'"),
        lambda r: evaluate_cli(r, "split=validation")),
    Row("evaluate", "scoring=nist", "error", ("scoring must be one of ['plain', 'gigaspeech']",),
        lambda r: evaluate_cli(r, "scoring=nist")),
    Row("evaluate", "no checkpoint=", "error", ("usage: python -m lmu_asr.evaluate",),
        lambda r: run_cli(lambda: evaluate.main(["data=demo"]))),
    # transcribe arguments
    Row("transcribe", "audio=[] (no file)", "error", ("audio= names no file",),
        lambda r: transcribe_cli(r, "audio=[]")),
    Row("transcribe", "a misspelt argument (decodr=beam)", "error",
        ("unknown argument(s) ['decodr']",),
        lambda r: transcribe_cli(r, f"audio={r / 'ok.wav'}", "decodr=beam")),
    Row("transcribe", "a missing file among good ones", "error",
        ("1 of 2 files could not be transcribed",),
        lambda r: transcribe_cli(r, f"audio=[{r / 'ok.wav'},{r / 'gone.wav'}]")),
    Row("transcribe", "audio shorter than one encoder frame", "error", ("1 of 1 files",),
        lambda r: transcribe_cli(r, f"audio={r / 'blip.wav'}")),
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A checkpoint (run/), a broken copy (broken/), audio files and manifests the rows use."""
    import shutil

    root = tmp_path_factory.mktemp("bad_input")
    _, step = make_checkpoint(root / "run")
    shutil.copytree(root / "run", root / "broken")
    model_file = root / "broken" / step.relative_to(root / "run") / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    lengths = {"ok": 1.0, "changed": 1.5, "long": 3.0, "short": 0.3, "blip": 0.005, "empty": 0}
    for name, seconds in lengths.items():
        write_wav(root / f"{name}.wav", seconds)
    datasets = pytest.importorskip("datasets")
    audio = {"bytes": (root / "ok.wav").read_bytes(), "path": None}
    rows = {"audio": [audio, audio], "text": ["fine", None]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(root / "hf"))
    (root / "junk.wav").write_bytes(b"RIFF not really a wave file" * 10)
    import numpy as np
    import soundfile

    nan = np.zeros(16000, dtype=np.float32)
    nan[8000:8160] = np.nan  # a float WAV can hold NaN: it would poison the feature statistics
    soundfile.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    manifest(root, line(audio="ok.wav", text="a"), "ok.jsonl")
    manifest(root, "".join(line(audio=f"x{i}.wav", text="a") for i in range(3)), "wrong.jsonl")
    manifest(root, line(audio="ok.wav", text="a") + line(audio="gone.wav", text="b"), "half.jsonl")
    return root


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.surface}: {r.input}" for r in ROWS])
def test_bad_input(row: Row, root: Path, tmp_path: Path, capsys) -> None:
    work = tmp_path / "w"
    work.mkdir()
    for p in root.iterdir():  # rows that write files write them here, not in the shared folder
        (work / p.name).symlink_to(p)
    if row.outcome == "error":
        with pytest.raises(ERRORS) as err:
            row.run(work)
        message = str(err.value.code if isinstance(err.value, SystemExit) else err.value)
        if isinstance(err.value, SystemExit):  # the command line's one line, no traceback
            assert message.startswith(("error: ", "usage: ")) and "\n" not in message, message
    else:
        skipped, message = row.run(work)
        assert getattr(skipped, "reason", None) == row.outcome.removeprefix("skip "), skipped
    for word in row.words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "Traceback" not in capsys.readouterr().err


def test_the_matrix_has_every_surface_and_at_least_25_rows() -> None:
    surfaces = {"launch", "tracking", "manifest", "audio", "transcript", "hf", "checkpoint"}
    assert {r.surface for r in ROWS} >= surfaces | {"evaluate", "transcribe"}
    assert len(ROWS) >= 25


def test_a_manifest_pointing_outside_its_folder_is_read_with_one_warning(tmp_path, caplog):
    """Allowed: shared datasets keep manifests apart from their audio. "../" paths resolve from
    the manifest's folder, and one warning says so (they break if the manifest moves alone)."""
    audio = write_wav(tmp_path / "a.wav")
    (tmp_path / "lists").mkdir()
    path = manifest(
        tmp_path / "lists", line(audio="../a.wav", text="a") * 2 + line(audio=str(audio), text="b")
    )
    utts = read_manifest(path)
    assert [Path(u.audio).resolve() for u in utts] == [audio.resolve()] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"{path}: 2 audio paths climb out of the manifest's folder, resolved from it (first: "
        f"../a.wav -> {audio}); keep the audio next to the manifest if you move it"
    ]
