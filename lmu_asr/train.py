"""train(cfg, run_dir): setup, resume, step loop, validation, checkpoints, final evaluation.

Loss normalisation: an optimizer step sums the CTC loss over every utterance of its global batch
(all micro-batches on all ranks) and divides by the global number of target tokens in it, so the
gradient does not depend on how the batch is split over ranks or accumulation steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lmu_asr import distributed
from lmu_asr.augment import training_augmenter
from lmu_asr.checkpoint import check_architecture, load_latest, model_config, save_checkpoint
from lmu_asr.data import Batch, SkipCounter
from lmu_asr.distributed import DistEnv
from lmu_asr.evaluate import evaluate_loader, final_evaluation, split_loader
from lmu_asr.features import compute_stats
from lmu_asr.model import SpeechRecognizer
from lmu_asr.optim import build_optimizer, lr_at
from lmu_asr.preemption import Lifecycle, StopFlag, comes_back, parse_signal, stop_reason
from lmu_asr.progress import Progress
from lmu_asr.report import write_report
from lmu_asr.state import TrainState
from lmu_asr.tracking import Tracker

if TYPE_CHECKING:
    from lmu_asr.config import Config

log = logging.getLogger("lmu_asr")


@dataclass
class TrainerConfig:
    """Hydra group `trainer`."""

    max_steps: int = 3000
    max_minutes: float = 0.0  # wall-clock budget summed over restarts; 0 = none
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0 = SLURM_CPUS_PER_TASK if set, else torch's default
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16 | fp16
    grad_clip: float = 5.0  # 0 = no clipping
    batches_per_step: int = 1  # global micro-batches per optimizer step, over all ranks
    log_every: int = 25
    eval_every: int = 250
    patience: int = 0  # evaluations without dev improvement before stopping; 0 = never
    metric: str = "cer"  # dev metric for early stopping and the best checkpoint: cer | wer
    stats_utts: int = 300  # training utterances for the global feature mean/std
    final_lm: bool = True  # final evaluation also with a word LM from the training transcripts
    stop_signal: str = "USR2"  # SLURM's time-limit / preemption warning (--signal; submitit's)
    max_restarts: int = 10  # requeues after a time limit or preemption before giving up

    def __post_init__(self) -> None:
        for name in ("max_steps", "batches_per_step", "log_every", "eval_every", "stats_utts"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_minutes", "grad_clip", "patience", "threads", "max_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        choices = {
            "device": ("auto", "cpu", "cuda"),
            "precision": ("auto", "fp32", "bf16", "fp16"),
            "metric": ("cer", "wer"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                value = getattr(self, name)
                raise ValueError(f"trainer.{name} must be one of {allowed}, got {value!r}")
        try:
            parse_signal(self.stop_signal)
        except ValueError as err:
            raise ValueError(f"trainer.stop_signal: {err}") from None


def train(cfg: Config, run_dir: Path, stop: StopFlag) -> dict:
    """Train in `run_dir`, resuming from its newest complete checkpoint; returns the results.
    `stop` is polled after every step; on a stop request rank 0 saves and the reason is returned
    (the caller requeues the job after a time limit or preemption: preemption.after_stop)."""
    tc = cfg.trainer
    env = distributed.env_from_environ()
    device = distributed.pick_device(tc.device, env)
    distributed.set_threads(tc.threads)
    distributed.init(env, device)
    _seed_everything(tc.seed)
    precision = distributed.pick_precision(tc.precision, device)
    if tc.batches_per_step % env.world_size:
        raise ValueError(
            f"trainer.batches_per_step ({tc.batches_per_step}) must be a multiple of the "
            f"world size ({env.world_size})"
        )
    accum = tc.batches_per_step // env.world_size

    model = SpeechRecognizer(cfg.model, cfg.features, cfg.data.sample_rate).to(device)
    loader, sampler = split_loader(cfg, "train", env, train=True)
    dev_loader, _ = split_loader(cfg, "dev", env, train=False)
    opt = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    state = TrainState()
    if found := load_latest(run_dir):
        path, ckpt = found
        check_architecture(ckpt["config"], cfg, path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state.load_state_dict(ckpt["train_state"])
        state.take_position(env.rank, env.world_size)
        state.restore_rng()
        log.info("resumed from %s (step %d, epoch %d)", path, state.step, state.epoch)
    elif cfg.features.normalize == "global":
        mean, std = compute_stats(model.frontend, loader.dataset, tc.stats_utts)
        model.frontend.set_stats(mean.to(device), std.to(device))

    ddp = DistributedDataParallel(model) if env.distributed else model
    saved_step = state.step if found else -1
    tracker = Tracker(cfg.tracking, run_dir, env.rank, asdict(cfg), state.run_id, env.world_size)
    lifecycle = Lifecycle(run_dir, env.is_main)
    lifecycle.started(state.step)

    def save() -> None:
        nonlocal saved_step, saved_at
        state.rank_positions = distributed.gather_ints([state.epoch, state.batch_in_epoch], device)
        if env.is_main and saved_step != state.step:
            state.run_id = tracker.run_id  # late if MLflow was down at the start
            state.capture_rng()
            items = {"model": model, "optimizer": opt, "scaler": scaler}
            items |= {"train_state": state, "config": model_config(cfg)}
            best = state.best_step if cfg.checkpoint.keep_best else None
            save_checkpoint(run_dir, state.step, items, cfg.checkpoint.keep_last, best)
        saved_step, saved_at = state.step, state.elapsed_s
        distributed.barrier()

    stream = _batches(loader, sampler, state)
    augment = training_augmenter(cfg)
    budget_s = tc.max_minutes * 60 or math.inf
    save_every_s = cfg.checkpoint.every_minutes * 60 or math.inf
    progress = Progress(tc.max_steps, budget_s, env.world_size)
    status = "budget" if state.elapsed_s >= budget_s else "finished"
    if tc.patience and state.bad_evals >= tc.patience:  # stopped early, killed before the end
        status = "early_stop"
    t_mark, saved_at, signum = time.monotonic(), state.elapsed_s, 0
    with tracker:
        while state.step < tc.max_steps and status == "finished":
            ddp.train()
            t_data = time.monotonic()
            group = [next(stream) for _ in range(accum)]
            progress.waited(time.monotonic() - t_data)
            done = max(state.step / tc.max_steps, state.elapsed_s / budget_s)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg.optim, state.step, done)
            seeds = [micro_batch_seed(tc.seed, state.step, i * env.world_size + env.rank)
                     for i in range(accum)]  # fmt: skip
            loss, gnorm, ok = train_step(
                ddp, group, opt, scaler, tc.grad_clip, precision, env, seeds, augment
            )
            if not ok and scaler.is_enabled() and math.isfinite(loss):
                # fp16: the scaled gradient overflowed, GradScaler lowers its scale; not the data
                state.fp16_overflows += 1
                log.info("step %d: fp16 gradient overflow, step skipped; loss scale now %g",
                         state.step, scaler.get_scale())  # fmt: skip
            elif not ok:
                state.nonfinite_steps += 1
                _record_nonfinite(run_dir, env, state.step, group, loss, gnorm)
            state.step += 1
            progress.add(loss, sum(b.wav_lens.sum().item() for b in group) / cfg.data.sample_rate)

            if state.step % tc.log_every == 0:
                lr = opt.param_groups[0]["lr"]
                metrics = progress.report(state.step, state.epoch, state.elapsed_s, lr, gnorm)
                tracker.log(metrics, state.step)
            if state.step % tc.eval_every == 0 or state.step == tc.max_steps:
                _validate(cfg, model, dev_loader, env, state, tracker)
                save()
                if tc.patience and state.bad_evals >= tc.patience:
                    log.info("early stop: no better dev %s in %d evals", tc.metric, tc.patience)
                    status = "early_stop"
                    break
            # wall clock, validation included, and stop requests: every rank agrees on both
            elapsed = state.elapsed_s + time.monotonic() - t_mark
            t_mark = time.monotonic()
            signum, state.elapsed_s = distributed.max_over_ranks(
                [stop.signum or 0, elapsed], device
            )
            if (
                state.step % cfg.checkpoint.every_steps == 0
                or state.elapsed_s - saved_at >= save_every_s
            ):
                save()
            if signum or state.elapsed_s >= budget_s:
                status = "stopped" if signum else "budget"
                if not signum and state.step % tc.eval_every:  # the last steps may be the best
                    _validate(cfg, model, dev_loader, env, state, tracker)
                break
        save()
        if status == "stopped":
            # rank 0 asks SLURM why (one scontrol call per job, not per rank) and records it
            reason = stop_reason(int(signum), parse_signal(tc.stop_signal)) if env.is_main else ""
            lifecycle.stopped(reason, state.step)
            tracker.close(None if comes_back(reason, tc.max_restarts) else "KILLED")  # RUNNING
            return {"status": status, "reason": reason, "step": state.step}

        texts = [u.text for u in loader.dataset.utts]
        results = final_evaluation(cfg, run_dir, model, env, state, tracker, texts)
        results |= {"status": status, "steps": state.step, "train_minutes": state.elapsed_s / 60}
        results |= {"nonfinite_steps": state.nonfinite_steps} | lifecycle.summary()
        results |= {"fp16_overflows": state.fp16_overflows} if scaler.is_enabled() else {}
        lifecycle.stopped(status, state.step)
        if env.is_main:
            (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            report = write_report(cfg, run_dir, model, dev_loader.dataset, state.best_step)
            for path in [run_dir / "results.json", run_dir / "evaluation.txt", *report]:
                tracker.log_artifact(path)
    return results


def _batches(loader, sampler, state: TrainState) -> Iterator[Batch]:
    """Endless stream of non-empty training batches; keeps state.epoch/batch_in_epoch exact and
    logs the utterances skipped as bad input at the end of each epoch."""
    skips = SkipCounter()
    while True:
        sampler.set_epoch(state.epoch, skip=state.batch_in_epoch)
        for batch in loader:
            state.batch_in_epoch += 1
            skips.add(batch)
            if len(batch.ids):
                yield batch
        if skips.total:
            log.warning("epoch %d: %s", state.epoch, skips.summary())
            skips.reset()
        state.epoch += 1
        state.batch_in_epoch = 0


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The seed of the random draws (dropout, SpecAugment) for global micro-batch `index` of
    optimizer step `step`. Rank r's i-th micro-batch is global index i * world_size + r, which is
    the batch one process would take at that position, so the draws do not depend on the world
    size, and a resumed job needs no RNG state to continue them."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def train_step(
    model,
    group: list[Batch],
    opt,
    scaler,
    clip: float,
    precision,
    env: DistEnv,
    seeds=None,
    augment: Callable[..., Batch] | None = None,
):
    """One optimizer step over the micro-batches of `group`. Returns (loss per token, gradient
    norm, whether loss and gradient were finite on every rank); a non-finite step is skipped.
    `seeds` (one per micro-batch) reseed torch's RNG before each forward pass, and `augment`
    (batch, seed=...) -> batch, if given, changes each micro-batch with draws from its seed."""
    if augment is not None and seeds is None:
        raise ValueError("train_step: augment draws from the micro-batches' seeds; none given")
    device = next(model.parameters()).device
    n_tokens = sum(b.token_lens.sum().item() for b in group)
    tokens = distributed.all_reduce_sum(torch.tensor(float(n_tokens), device=device))
    scale = env.world_size / tokens.clamp(min=1)  # DDP averages gradients over ranks: undo it
    total = torch.zeros((), device=device)
    for i, batch in enumerate(group):
        if augment is not None:
            batch = augment(batch, seed=seeds[i])
        batch = batch.to(device)
        if seeds is not None:
            torch.manual_seed(seeds[i])
        last = i == len(group) - 1
        no_sync = isinstance(model, DistributedDataParallel) and not last
        with model.no_sync() if no_sync else contextlib.nullcontext():
            with torch.autocast(device.type, precision, enabled=precision != torch.float32):
                log_probs, out_lens = model(batch.wav, batch.wav_lens)  # (B, T, V), (B,)
            loss = F.ctc_loss(
                log_probs.transpose(0, 1).float(), batch.tokens, out_lens, batch.token_lens,
                reduction="sum",
            )  # fmt: skip
            scaler.scale(loss * scale).backward()
        total += loss.detach()
    scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)
    bad = not bool(torch.isfinite(total) and torch.isfinite(gnorm))
    ok = not distributed.any_rank(bad, device)
    if ok:
        scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return (distributed.all_reduce_sum(total) / tokens).item(), gnorm.item(), ok


def _validate(cfg: Config, model, dev_loader, env, state: TrainState, tracker) -> None:
    totals, _ = evaluate_loader(model, dev_loader, env)
    value = totals[cfg.trainer.metric]
    if value < state.best_metric:
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
    else:
        state.bad_evals += 1
    log.info(
        "dev @ step %d: CER %.4f  WER %.4f  (best %s %.4f @ step %d)",
        *(state.step, totals["cer"], totals["wer"], cfg.trainer.metric),
        *(state.best_metric, state.best_step),
    )
    tracker.log({"dev/cer": totals["cer"], "dev/wer": totals["wer"], "dev/loss": totals["loss"]},
                state.step)  # fmt: skip


def _record_nonfinite(run_dir: Path, env, step: int, group, loss: float, gnorm: float) -> None:
    log.warning("step %d: non-finite loss %s or grad norm %s; step skipped", step, loss, gnorm)
    record = {"step": step, "rank": env.rank, "loss": loss, "grad_norm": gnorm}
    record["ids"] = [i for b in group for i in b.ids]
    with open(run_dir / f"nonfinite-rank{env.rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
