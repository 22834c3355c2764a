"""Two real processes in a gloo process group train like one process with the same global batch."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from lmu_asr.checkpoint import list_checkpoints, load_checkpoint
from tests.test_train import SMALL, corpus_env  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

# dropout and SpecAugment stay on: their draws are keyed by (seed, step, global micro-batch)
SAME = [*SMALL, "model.dropout=0.1", "features.freq_masks=1", "features.time_masks=1"]
SAME += ["tracking=off", "trainer.max_steps=4", "trainer.eval_every=4"]
SAME += ["trainer.batches_per_step=2", "trainer.final_lm=false", "optim.warmup_steps=1"]
# a large Adam eps: updates of near-zero gradients stay near zero instead of ~lr * sign(g), so
# rounding differences between the two set-ups cannot flip them into full-size differences
SAME += ["optim.eps=1e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path, corpus_env):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "lmu_asr.launch", *SAME]
    subprocess.run([*cmd, f"hydra.run.dir={one}"], env=corpus_env, check=True, timeout=600,
                   capture_output=True)  # fmt: skip
    port = free_port()
    procs = [
        subprocess.Popen(
            [*cmd, f"hydra.run.dir={two}"],
            env=corpus_env
            | {
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)

    a, b = (load_checkpoint(list_checkpoints(d)[-1]) for d in (one, two))
    assert a["train_state"]["step"] == b["train_state"]["step"] == 4
    for name, p in a["model"].items():
        torch.testing.assert_close(p, b["model"][name], atol=1e-5, rtol=1e-4, msg=name)
    # both processes evaluated their shard; rank 0 wrote the results of all utterances
    assert (two / "results.json").is_file()
