"""Shared fixtures: a few real audio files (wav, flac, ogg/vorbis, ogg/opus) and a manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from tests.cluster import cluster_dir, slurm_cluster, slurm_cluster_2nodes  # noqa: F401

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: more threads contend
    torch.set_num_threads(1)
os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the HuggingFace hub (nor may CI)


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """`datasets`, with its caches under tmp_path and the hub off, even if imported earlier."""
    import huggingface_hub.constants

    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return datasets


def tone(seconds: float, rate: int = 16000, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    """A quiet sine with a little noise, (samples,) or (samples, channels) float32."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(int(freq))
    wav = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(len(t))
    wav = wav.astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


# name: (file, seconds, sample rate, channels, soundfile format, subtype, transcript)
AUDIO_FILES = {
    "wav": ("a.wav", 2.0, 16000, 1, "WAV", "PCM_16", "Hello world, it's 2 PM."),
    "flac": ("b.flac", 1.5, 16000, 2, "FLAC", "PCM_16", "a stereo flac file"),
    "ogg": ("c.ogg", 1.2, 22050, 1, "OGG", "VORBIS", "resampled from twenty two k"),
    "opus": ("d.opus", 1.0, 48000, 1, "OGG", "OPUS", "opus at forty eight k"),
}


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the files in AUDIO_FILES plus "manifest" (relative audio paths, raw text)."""
    folder = tmp_path_factory.mktemp("audio")
    paths: dict[str, Path] = {}
    rows = []
    for name, (file, seconds, rate, channels, fmt, subtype, text) in AUDIO_FILES.items():
        paths[name] = folder / file
        soundfile.write(
            paths[name], tone(seconds, rate, channels), rate, format=fmt, subtype=subtype
        )
        rows.append({"id": name, "audio": file, "text": text})
    paths["manifest"] = folder / "manifest.jsonl"
    paths["manifest"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (`scripts/test.sh` runs `-n 2 --dist loadgroup`), every test that
    needs a SLURM cluster runs on one worker, so the session still starts one cluster; the other
    worker takes the rest. Most SLURM tests wait on the scheduler, so the two overlap well."""
    cluster = {"slurm_cluster", "slurm_cluster_2nodes"}
    for item in items:
        if item.get_closest_marker("slurm") or cluster & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("slurm"))
