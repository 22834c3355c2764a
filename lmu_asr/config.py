"""The job's configuration: one dataclass per group, each owned by the module that uses it,
composed here and registered in Hydra's ConfigStore as the schema of conf/config.yaml (so a typo in
an override fails at compose time) and validated by the dataclasses' __post_init__ (so a bad value
fails before any work starts or any job is submitted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lmu_asr import distributed
from lmu_asr.augment import AugmentConfig
from lmu_asr.checkpoint import CheckpointConfig
from lmu_asr.data import DataConfig
from lmu_asr.features import FeatureConfig
from lmu_asr.model import ModelConfig
from lmu_asr.optim import OptimConfig
from lmu_asr.tracking import TrackingConfig
from lmu_asr.train import TrainerConfig

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
SWEEPS_DIR = ROOT / "sweeps"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def register() -> None:
    """Schema for conf/config.yaml, every sweeps/<name>.yaml as the `sweep` group (its runs go
    to the MLflow experiment <name> unless it says otherwise), and the
    resolvers conf/config.yaml uses so that only rank 0 writes `.hydra/` and `train.log`."""
    OmegaConf.register_new_resolver("lmu.rank_suffix", _rank_suffix, replace=True)
    OmegaConf.register_new_resolver("lmu.rank0_only", _rank0_only, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for path in sorted(SWEEPS_DIR.glob("*.yaml")):
        node = OmegaConf.load(path)
        if OmegaConf.select(node, "tracking.experiment") is None:  # one experiment per study
            node = OmegaConf.merge({"tracking": {"experiment": path.stem}}, node)
        cs.store(group="sweep", name=path.stem, node=node, package="_global_")


def _rank_suffix() -> str:
    rank = distributed.env_from_environ().rank
    return f"-rank{rank}" if rank else ""


def _rank0_only(value: Any) -> Any:
    return None if distributed.env_from_environ().rank else value


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Composed Hydra config -> validated Config (raises ValueError naming the field)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
