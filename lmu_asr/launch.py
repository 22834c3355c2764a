"""The one entry point: `python -m lmu_asr.launch [overrides]` runs one job (the demo with no
overrides); `python -m lmu_asr.launch -m sweep=NAME` runs a sweep (Hydra multirun)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lmu_asr import distributed
from lmu_asr.config import CONF_DIR, Config, register, to_config
from lmu_asr.preemption import Lifecycle, StopFlag, after_stop, parse_signal
from lmu_asr.train import train

register()
log = logging.getLogger("lmu_asr")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict:
    config = to_config(cfg)  # validates every group before any work starts
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    env = distributed.env_from_environ()
    if env.rank != 0:  # one progress log per job: the other ranks only warn
        logging.getLogger().setLevel(logging.WARNING)
    log.info("run directory: %s", run_dir)
    stop_signal = parse_signal(config.trainer.stop_signal)
    # replaces submitit's USR2 handler (the loop stays in charge); ignored once training is over
    with StopFlag(
        (signal.SIGINT, signal.SIGTERM, stop_signal), ignore_after=(stop_signal,)
    ) as stop:
        try:
            results = train(config, run_dir, stop)
        except Exception as err:  # a bug or bad input: the job fails, visibly, and stays failed
            error = f"rank {env.rank}: {type(err).__name__}: {err}"  # from the rank that failed
            Lifecycle(run_dir, is_main=True).stopped("failed", None, error)
            distributed.destroy(synchronize=False)
            raise
        distributed.destroy()  # the process group train() joined
        if results["status"] == "stopped":
            after_stop(results["reason"], config.trainer.max_restarts, stop, env.is_main)
    return results


def compose_config(overrides: list[str]) -> Config:
    """The validated Config that `launch` would run with these overrides (no run directory)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=overrides))


if __name__ == "__main__":
    main()
