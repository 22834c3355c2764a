"""The training state: one small dataclass, saved in every checkpoint as `train_state`.

With the random draws of every micro-batch keyed by (seed, step, micro-batch: train.py), the RNG
states here only carry what runs outside the steps (python / numpy / torch global generators)."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # evaluations without improvement (early stopping)
    nonfinite_steps: int = 0  # skipped: non-finite loss or gradient (bad input, divergence)
    fp16_overflows: int = 0  # skipped by fp16 GradScaler: the scaled gradient overflowed
    elapsed_s: float = 0.0
    run_id: str | None = None  # MLflow run id, so a requeued job continues the same run
    rng: dict = field(default_factory=dict)
    # [epoch, batch_in_epoch] of every rank at the save: ranks drift apart (a batch whose
    # utterances were all skipped as bad input is used up without being a micro-batch)
    rank_positions: list = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        if unknown := set(d) - {f.name for f in fields(self)}:
            raise KeyError(f"TrainState.load_state_dict: unknown keys {sorted(unknown)}")
        for k, v in d.items():
            setattr(self, k, v)

    def take_position(self, rank: int, world_size: int) -> None:
        """After loading: continue where this rank stopped (with another world size the shards
        differ, and rank 0's position stands for all, as BucketBatchSampler does)."""
        if len(self.rank_positions) == world_size:
            self.epoch, self.batch_in_epoch = self.rank_positions[rank]

    def capture_rng(self) -> None:
        """Store python, numpy (legacy global), torch CPU and all CUDA generator states."""
        version, mt, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        self.rng = {
            "python": {"version": version, "state": torch.tensor(mt), "gauss": gauss},
            "numpy": {
                "name": name,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "torch": torch.get_rng_state(),
            # only if this process uses CUDA: do not create contexts just to read RNG states
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        }

    def restore_rng(self) -> None:
        if not self.rng:
            raise ValueError("TrainState.restore_rng: no RNG state captured")
        p, n = self.rng["python"], self.rng["numpy"]
        random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(_cpu_bytes(self.rng["torch"]))
        cuda = self.rng.get("cuda") or []
        if cuda and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([_cpu_bytes(s) for s in cuda])
            else:
                log.warning(
                    "CUDA RNG not restored: %d states saved, %d devices visible",
                    len(cuda),
                    torch.cuda.device_count(),
                )


def _cpu_bytes(t: torch.Tensor) -> torch.Tensor:
    # set_rng_state needs a CPU ByteTensor, whatever map_location the checkpoint was loaded with
    return t.to("cpu", torch.uint8)
