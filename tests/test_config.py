"""Every config option and every sweep file composes into a valid Config; bad values are
refused with a message that names the field, before any work starts."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from lmu_asr.config import CONF_DIR, SWEEPS_DIR, register, to_config
from lmu_asr.launch import compose_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
SWEEPS = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
REQUIRED = {
    "manifest": ["data.manifest=/data/train.jsonl"],
    "hf": [],
    "prepared": ["data.dir=/data/gs-xs"],
}


def test_every_group_has_options():
    assert {"model", "data", "features", "optim", "trainer", "checkpoint", "tracking"} <= set(
        GROUPS
    )
    assert {"lmu_tiny", "lmu_small", "lmu_base"} <= {o for g, o in OPTIONS if g == "model"}
    assert {"demo", "manifest", "hf", "prepared"} <= {o for g, o in OPTIONS if g == "data"}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_sets_its_values(group, option):
    """Each key of conf/<group>/<option>.yaml arrives, with its value, in the validated Config."""
    required = REQUIRED.get(option, [])
    cfg = compose_config([f"{group}={option}", *required])
    raw = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    for override in required:  # the option's required (???) values come from the command line
        key, value = override.split("=", 1)
        raw[key.split(".", 1)[1]] = value
    expected = OmegaConf.to_container(raw, resolve=True)
    assert expected, f"conf/{group}/{option}.yaml sets nothing"
    actual = {key: getattr(getattr(cfg, group), key) for key in expected}
    assert actual == expected


def test_defaults_and_overrides_take_effect():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.data.source, cfg.data.corpus_train) == ("lmu_small", "demo", 14000)
    assert (cfg.optim.lr, cfg.trainer.max_minutes, cfg.tracking.enabled) == (3e-3, 8.5, True)
    cfg = compose_config(["model=lmu_tiny", "model.order=8", "trainer.max_steps=7"])
    assert (cfg.model.name, cfg.model.d_model, cfg.model.order) == ("lmu_tiny", 64, 8)
    assert cfg.trainer.max_steps == 7 and cfg.data.source == "demo"


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


BAD_VALUES = [
    ("optim.lr=-0.001", "optim.lr must be > 0, got -0.001"),
    ("model.order=0", "model.order must be >= 1, got 0"),
    (
        "data.max_frames=100",
        "data.max_frames=100: is smaller than one utterance of max_duration=20.0 s (2001 frames)",
    ),
    ("trainer.device=tpu", "trainer.device must be one of ('auto', 'cpu', 'cuda'), got 'tpu'"),
    ("trainer.max_steps=0", "trainer.max_steps must be >= 1, got 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1, got 0"),
    (
        "features.normalize=sometimes",
        "features.normalize='sometimes': must be one of ('global', 'utterance', 'none')",
    ),
    ("data.source=ftp", "data.source='ftp': must be one of ('demo', 'manifest', 'hf', 'prepared')"),
    (
        "data.source=prepared",
        "data.dir=None: data.source=prepared needs the folder written by lmu_asr.prepare",
    ),
    ("data.cache_groups=0", "data.cache_groups=0: must be >= 1"),
    ("data.corpus_unseen=5000", "data.corpus_unseen=5000: must be <= 2000 (sentences kept for it)"),
    ("augment.noise_prob=2", "augment.noise_prob=2.0: is a probability: must be in [0, 1]"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError) as err:
        compose_config([override])
    assert err.type is ValueError and str(err.value) == message


def test_unknown_preset_and_unknown_key_are_refused():
    with pytest.raises(MissingConfigException, match=r"Could not find 'model/lmu_huge'") as err:
        compose_config(["model=lmu_huge"])
    assert "lmu_tiny" in str(err.value)  # the available options are listed
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'model\.ordr'"):
        compose_config(["model.ordr=3"])
    with pytest.raises(ConfigCompositionException, match=r"trainer\.max_steps=abc"):
        compose_config(["trainer.max_steps=abc"])
