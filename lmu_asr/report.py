"""What a finished run leaves a researcher, beside results.json: pictures and files, written to
`<run_dir>/report/` and logged as MLflow artifacts."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from lmu_asr.checkpoint import checkpoint_dir
from lmu_asr.speech_dataset import Item

if TYPE_CHECKING:
    from lmu_asr.config import Config
    from lmu_asr.model import SpeechRecognizer
    from lmu_asr.speech_dataset import SpeechDataset

log = logging.getLogger("lmu_asr")
MAX_MODEL_ARTIFACT_BYTES = 50 * 2**20  # the model file itself goes to MLflow below this size


def write_report(
    cfg: Config, run_dir: Path, model: SpeechRecognizer, dev: SpeechDataset, best_step: int
) -> list[Path]:
    """The resolved config, the best model's path and checksum (the file too when small),
    learning curves, and the attention map and CTC posteriogram of the first readable dev
    utterance (a fixed one, so runs compare). Returns the files to log as artifacts."""
    from lmu_asr.plots import learning_curves, utterance_plots  # matplotlib: ~1 s to import

    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    config = out / "config.json"
    config.write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    paths = [config, learning_curves(run_dir / "metrics.jsonl", out / "learning_curves.png")]
    paths += _best_model(run_dir, best_step, out)
    for i in range(min(len(dev), 20)):
        if isinstance(item := dev[i], Item):
            plots = utterance_plots(model, item.wav, dev.utts[i].text, out, name=item.id)
            paths += [plots.attention, plots.posteriogram]
            break
    else:
        log.warning("report: no readable dev utterance among the first 20; no utterance plots")
    return paths


def _best_model(run_dir: Path, best_step: int, out: Path) -> list[Path]:
    folder = checkpoint_dir(run_dir, best_step)
    if best_step < 0 or not (folder / "meta.json").exists():
        return []
    meta = json.loads((folder / "meta.json").read_text())
    record = {"checkpoint": str(folder.resolve()), "step": best_step}
    record["model.pt"] = meta["files"]["model.pt"]  # size and sha256
    path = out / "best_model.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    small = record["model.pt"]["size"] <= MAX_MODEL_ARTIFACT_BYTES
    return [path, folder / "model.pt"] if small else [path]
