"""Every config option and every sweep file composes into a valid Config; bad values are
refused with a message that names the field, before any work starts."""

import pytest
from hydra import compose, initialize_config_dir

from lmu_asr.config import CONF_DIR, SWEEPS_DIR, register, to_config
from lmu_asr.launch import compose_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
SWEEPS = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
REQUIRED = {"manifest": ["data.manifest=/data/train.jsonl"], "hf": []}


def test_every_group_has_options():
    assert {"model", "data", "features", "optim", "trainer", "checkpoint", "tracking"} <= set(
        GROUPS
    )
    assert {"lmu_tiny", "lmu_small", "lmu_base"} <= {o for g, o in OPTIONS if g == "model"}
    assert {"demo", "manifest", "hf"} <= {o for g, o in OPTIONS if g == "data"}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"] + REQUIRED.get(option, []))
    assert getattr(cfg, group) is not None


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_composes(name):
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=[f"sweep={name}"], return_hydra_config=True)
    params = raw.hydra.sweeper.params
    assert params, f"sweeps/{name}.yaml sets no hydra.sweeper.params"
    # every swept value composes and validates too
    for key, values in params.items():
        for value in str(values).split(","):
            compose_config([f"sweep={name}", f"{key}={value.strip()}"])
    raw = dict(raw)
    raw.pop("hydra")
    to_config(raw)


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=-0.001", "optim.lr"),
        ("model.order=0", "model.order"),
        ("data.max_frames=100", "data.max_frames"),
        ("trainer.device=tpu", "trainer.device"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("checkpoint.keep_last=0", "keep_last"),
        ("features.normalize=sometimes", "features.normalize"),
        ("data.source=ftp", "data.source"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        compose_config([override])


def test_unknown_preset_and_unknown_key_are_refused():
    with pytest.raises(Exception, match="lmu_huge"):
        compose_config(["model=lmu_huge"])
    with pytest.raises(Exception, match="ordr"):
        compose_config(["model.ordr=3"])
