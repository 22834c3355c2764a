"""Checkpoint save and load time and size: model, AdamW state and training state, written
atomically (temp folder, fsync, rename, marker) and loaded with checksums and weights_only."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from lmu_asr.bench.measure import Measurement, times
from lmu_asr.bench.train import model_config
from lmu_asr.checkpoint import load_checkpoint, save_checkpoint
from lmu_asr.features import FeatureConfig
from lmu_asr.model import SpeechRecognizer
from lmu_asr.optim import OptimConfig, build_optimizer
from lmu_asr.state import TrainState


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lmu_base", help="conf/model preset")
    p.add_argument("--dir", type=Path, default=Path("."),
                   help="where to write (the disk the run directories are on)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5)


def run(args: argparse.Namespace, device: torch.device) -> list[Measurement]:
    torch.manual_seed(0)
    model = SpeechRecognizer(model_config(args.model), FeatureConfig())
    opt = build_optimizer(model, OptimConfig())
    for p in model.parameters():  # one step, so that AdamW holds its moments, as in a real run
        p.grad = torch.randn_like(p)
    opt.step()
    state = TrainState()
    state.capture_rng()
    items = {"model": model, "optimizer": opt, "train_state": state, "config": {"bench": True}}
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    try:
        step = iter(range(1, 10**6))
        saved: list[Path] = []
        save_s = times(lambda: saved.append(save_checkpoint(root, next(step), items, 2)),
                       args.repeats)  # fmt: skip
        load_s = times(lambda: load_checkpoint(saved[-1]), args.repeats)
        size = sum(f.stat().st_size for f in saved[-1].iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    config = {"model": args.model, "parameters": params, "size_MB": round(size / 2**20, 1)}
    config |= {"dir": str(args.dir.resolve())}
    save = Measurement("checkpoint_save", "s", save_s, config, bar="<= 2")
    save.met = save.median <= 2
    save.note = "model + AdamW + train state; temp folder, fsync, rename, marker, prune"
    load = Measurement("checkpoint_load", "s", load_s, config, bar="<= 1")
    load.met = load.median <= 1
    load.note = "checksums verified, torch.load(weights_only=True)"
    return [save, load]
