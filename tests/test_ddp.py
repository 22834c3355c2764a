"""Two real processes in a gloo process group train and evaluate like one process with the same
global batch: the same raw gradients, losses, parameters, and per-utterance results."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from lmu_asr import distributed
from lmu_asr.checkpoint import list_checkpoints, load_checkpoint
from lmu_asr.data import Item, collate
from lmu_asr.distributed import DistEnv
from lmu_asr.evaluate import evaluate_loader, split_loader
from lmu_asr.launch import compose_config
from lmu_asr.model import SpeechRecognizer
from lmu_asr.text import encode
from lmu_asr.train import micro_batch_seed, train_step
from tests.test_train import SMALL, corpus_env, logged_values  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

# dropout and SpecAugment stay on: their draws are keyed by (seed, step, global micro-batch)
SAME = [*SMALL, "model.dropout=0.1", "features.freq_masks=1", "features.time_masks=1"]
SAME += ["tracking=off", "trainer.max_steps=4", "trainer.eval_every=4", "trainer.log_every=1"]
SAME += ["trainer.batches_per_step=2", "trainer.final_lm=false", "optim.warmup_steps=1"]
# a large Adam eps: updates of near-zero gradients stay near zero instead of ~lr * sign(g), so
# rounding differences between the two set-ups cannot flip them into full-size differences
SAME += ["optim.eps=1e-3"]
# small batches: dev and test make 3 each, so 2 ranks pad with a repeat that must be de-duplicated
SAME += ["data.max_frames=1000", "data.max_duration=8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path, corpus_env):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "lmu_asr.launch", *SAME]
    port = free_port()
    ranks = {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }  # fmt: skip
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = [  # all three at once
        subprocess.Popen([*cmd, f"hydra.run.dir={one}"], env=corpus_env, **kw),
        *[subprocess.Popen([*cmd, f"hydra.run.dir={two}"],
                           env=corpus_env | ranks | {"RANK": str(r), "LOCAL_RANK": str(r)}, **kw)
          for r in range(2)],
    ]  # fmt: skip
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)

    a, b = (load_checkpoint(list_checkpoints(d)[-1]) for d in (one, two))
    assert a["train_state"]["step"] == b["train_state"]["step"] == 4
    for name, p in a["model"].items():
        torch.testing.assert_close(p, b["model"][name], atol=1e-5, rtol=1e-4, msg=name)

    # the logs: each step's loss (summed over the global batch) and its raw gradient norm (before
    # clipping and the optimizer: a wrong world-size factor in the loss scale shows here), the
    # dev loss (every dev utterance once, gathered from both ranks)
    logs = [logged_values(d) for d in (one, two)]
    assert [m["step"] for m in logs[0]] == [m["step"] for m in logs[1]] == [1, 2, 3, 4, 4, 4]
    for m1, m2 in zip(*logs, strict=True):
        assert m1.keys() == m2.keys()
        for key in m1.keys() & {"train/loss", "train/grad_norm", "dev/loss", "train/lr"}:
            assert m2[key] == pytest.approx(m1[key], rel=1e-4), (m1["step"], key)
    assert "dev/loss" in logs[0][-2] and "final/test_cer" in logs[0][-1]

    # results.json: rank 0 wrote the results of all utterances; the models differ by rounding,
    # which may flip a near-tied frame, hence the tolerance
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert (r1["steps"], r1["best_step"]) == (r2["steps"], r2["best_step"]) == (4, 4)
    for key in ("dev_cer", "dev_wer", "test_cer", "test_wer"):
        assert r2[key] == pytest.approx(r1[key], abs=0.01), key


# --- the same pieces in two forked gloo ranks: raw gradients and per-utterance evaluation -----


class RecordGradients(torch.optim.Optimizer):
    """An optimizer that only keeps a copy of the gradients it is asked to apply."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def micro_batches() -> list:
    """Two micro-batches of noise with transcripts of different lengths (8 and 32 tokens):
    the loss is normalised by the global token count, not by each rank's."""
    g = torch.Generator().manual_seed(0)
    texts = [["a cat", "dog"], ["the quick brown", "fox jumps over it"]]
    return [
        collate([
            Item(f"{i}-{j}", 0.1 * torch.randn(12000 + 3000 * j, generator=g),
                 torch.tensor(encode(text)))
            for j, text in enumerate(pair)
        ])
        for i, pair in enumerate(texts)
    ]  # fmt: skip


def gradients_and_evaluation(cfg, env: DistEnv) -> dict:
    """Optimizer step 0 on global micro-batch `rank` (all of them in one process); then the
    dev split evaluated, each rank its shard."""
    torch.manual_seed(0)
    model = SpeechRecognizer(cfg.model, cfg.features, cfg.data.sample_rate)
    net = torch.nn.parallel.DistributedDataParallel(model) if env.distributed else model
    batches = micro_batches()
    indices = [env.rank] if env.distributed else [0, 1]
    group = [batches[i] for i in indices]
    seeds = [micro_batch_seed(cfg.trainer.seed, 0, i) for i in indices]
    opt = RecordGradients(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, gnorm, ok = train_step(net, group, opt, scaler, 0.0, torch.float32, env, seeds)
    model.eval()
    totals, rows = evaluate_loader(model, split_loader(cfg, "dev", env, train=False)[0], env)
    return {"grads": opt.grads, "loss": loss, "gnorm": gnorm, "ok": ok, "totals": totals,
            "rows": rows}  # fmt: skip


def _rank_main(rank: int, port: int, cfg, out: Path) -> None:
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    try:
        env = distributed.env_from_environ()
        distributed.init(env, torch.device("cpu"), timeout_min=2)
        torch.save(gradients_and_evaluation(cfg, env), out / f"rank{rank}.pt")
        distributed.destroy()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def test_two_ranks_raw_gradients_and_per_utterance_results_equal_one_process(
    tmp_path,
    corpus_env,  # noqa: F811
):
    cache = corpus_env["LMU_ASR_CACHE"]
    cfg = compose_config([*SAME, f"data.cache_dir={cache}"])
    shards = [split_loader(cfg, "dev", DistEnv(r, r, 2), train=False)[1].batches(0) for r in (0, 1)]
    ids = [{i for batch in shard for i in batch} for shard in shards]
    assert ids[0] & ids[1], "no utterance repeated across ranks: de-duplication untested"

    ctx = multiprocessing.get_context("fork")  # no second import of torch: about a second
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, cfg, tmp_path)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    errors = [f.read_text() for f in sorted(tmp_path.glob("rank*.err"))]
    assert all(p.exitcode == 0 for p in procs), "\n".join(errors)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = gradients_and_evaluation(cfg, DistEnv())

    # the raw gradient before the optimizer: the DDP average over ranks of the loss scaled by
    # world_size / global tokens is the gradient of the global batch's loss per token
    assert one["ok"] and ranks[0]["ok"]
    for rank in ranks:
        assert rank["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert rank["gnorm"] == pytest.approx(one["gnorm"], rel=1e-4)
        for i, (g2, g1) in enumerate(zip(rank["grads"], one["grads"], strict=True)):
            torch.testing.assert_close(g2, g1, rtol=1e-3, atol=1e-6 * one["gnorm"], msg=str(i))
    assert math.isfinite(one["gnorm"]) and one["gnorm"] > 0

    # evaluation: every dev utterance exactly once, as one process scores it
    (t1, rows1), (t2, rows2) = (one["totals"], one["rows"]), (ranks[0]["totals"], ranks[0]["rows"])
    assert [r["id"] for r in rows1] == sorted(f"dev-{i:06d}" for i in range(8))
    assert rows2 == rows1
    assert ranks[1]["rows"] == []  # rows on rank 0 only; totals on every rank
    for totals in (t2, ranks[1]["totals"]):
        assert totals.pop("loss") == pytest.approx(t1["loss"], rel=1e-5)
        assert totals == {k: v for k, v in t1.items() if k != "loss"}
    assert any(r["hyp"] for r in rows1)  # the hypotheses are not all empty
