"""WER/CER of a checkpoint on a data split, and the evaluation pieces the trainer shares.

    python -m lmu_asr.evaluate checkpoint=RUN_DIR_OR_STEP_DIR [data=manifest data.manifest=F.jsonl]
        [split=train|dev|test|unseen] [decoder=greedy|beam] [beam.beam_size=16]
        [scoring=plain|gigaspeech] [report=FILE.json] [allow_skips=false]

With data=manifest the file scored is data.manifest; otherwise split defaults to test.
Every utterance is scored or accounted for: one that cannot be scored (unreadable audio, empty
transcript, ...) fails the evaluation with a count per reason, unless allow_skips=true, which
scores the rest and shows the skips in the table and the report. Nothing scored is an error.

Any other `group.key=value` is a Hydra override of the data/features settings (conf/).
The model's architecture and feature settings come from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from lmu_asr import distributed
from lmu_asr.checkpoint import CheckpointError, checkpoint_dir, latest_checkpoint, load_checkpoint
from lmu_asr.data import (
    SPLITS,
    BucketBatchSampler,
    SkipCounter,
    SpeechDataset,
    Utterance,
    has_unseen,
    load_split,
    make_loader,
    num_frames,
)
from lmu_asr.decode import BeamConfig, Decoder, alignment, error_rates, make_decoder
from lmu_asr.distributed import DistEnv
from lmu_asr.lm import build_lm
from lmu_asr.prepared import PreparedSplit, ShardAudio
from lmu_asr.progress import LoopProgress
from lmu_asr.state import TrainState
from lmu_asr.text import decode as decode_ids
from lmu_asr.text import gigaspeech_scoring

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from lmu_asr.config import Config
    from lmu_asr.model import SpeechRecognizer

log = logging.getLogger(__name__)
SCORING: dict[str, Callable[[str], str] | None] = {"plain": None, "gigaspeech": gigaspeech_scoring}


def split_loader(
    cfg: Config, split: str, env: DistEnv, train: bool
) -> tuple[DataLoader, BucketBatchSampler]:
    """Dataset, length-bucketed sampler (sharded over ranks) and loader of one split."""
    utts = load_split(cfg.data, split)
    dataset = SpeechDataset(
        utts,
        sample_rate=cfg.data.sample_rate,
        max_duration=cfg.data.max_duration,
        strict=cfg.data.strict,
        subsampling=cfg.model.subsampling,
        hop_ms=cfg.features.hop_ms,
    )
    prepared = isinstance(utts, PreparedSplit)  # durations and shards from its index
    seconds = utts.durations if prepared else np.array([u.duration for u in utts], dtype=float)
    # capped: one over max_frames is over max_duration too, and the dataset skips it as too long
    frames = np.minimum(num_frames(seconds, cfg.features.hop_ms), cfg.data.max_frames)
    sampler = BucketBatchSampler(
        frames,
        cfg.data.max_frames,
        seed=cfg.trainer.seed,
        shuffle=train,
        rank=env.rank,
        world_size=env.world_size,
        shards=utts.shards if prepared else None,
    )
    return make_loader(dataset, sampler, cfg.data.num_workers), sampler


def evaluate_loader(
    model: SpeechRecognizer,
    loader: DataLoader,
    env: DistEnv,
    decoder: str = "greedy",
    beam: BeamConfig | None = None,
    scoring: str = "plain",
    progress: bool = False,
) -> tuple[dict, list[dict]]:
    """Decode every utterance of `loader` (all ranks share the work) -> (totals, per utterance).

    Totals are complete on every rank; per-utterance rows only on rank 0."""
    decoders = {decoder: make_decoder(decoder, beam)}
    return evaluate_decoders(model, loader, env, decoders, scoring, progress)[decoder]


@torch.no_grad()
def evaluate_decoders(
    model: SpeechRecognizer,
    loader: DataLoader,
    env: DistEnv,
    decoders: Mapping[str, Decoder],
    scoring: str = "plain",
    progress: bool = False,
) -> dict[str, tuple[dict, list[dict]]]:
    """Like evaluate_loader, for several decoders over one forward pass: name -> results."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader.batch_sampler.set_epoch(0)
    refs: dict[str, str] = {}
    hyps: dict[str, dict[str, str]] = {name: {} for name in decoders}
    losses: dict[str, tuple[float, int]] = {}  # id -> (CTC loss, target tokens)
    skipped: dict[str, str] = {}  # id -> reason
    with LoopProgress(len(loader), "decoding", "batches", enabled=progress and env.is_main) as bar:
        for batch in loader:
            bar.update()
            skipped |= dict(batch.skipped)
            if not len(batch.ids):
                continue
            batch = batch.to(device)
            log_probs, out_lens = model(batch.wav, batch.wav_lens)
            texts = [decode_ids(t[:n].tolist()) for t, n in zip(batch.tokens, batch.token_lens)]
            refs |= dict(zip(batch.ids, texts, strict=True))
            loss = F.ctc_loss(log_probs.transpose(0, 1).float(), batch.tokens, out_lens,
                              batch.token_lens, reduction="none", zero_infinity=True)  # fmt: skip
            n = batch.token_lens.tolist()
            losses |= {i: (x, k) for i, x, k in zip(batch.ids, loss.tolist(), n, strict=True)}
            for name, decode in decoders.items():
                hyps[name] |= dict(zip(batch.ids, decode(log_probs, out_lens), strict=True))
    model.train(was_training)
    if dist.is_initialized():  # shards may repeat an utterance to even out: dedupe by id
        gathered: list = [None] * env.world_size
        dist.all_gather_object(gathered, (refs, hyps, skipped, losses))
        refs = {k: v for r, *_ in gathered for k, v in r.items()}
        hyps = {name: {k: v for _, h, *_ in gathered for k, v in h[name].items()} for name in hyps}
        skipped = {k: v for _, _, s, _ in gathered for k, v in s.items()}
        losses = {k: v for *_, los in gathered for k, v in los.items()}
    loss = sum(x for x, _ in losses.values()) / max(sum(k for _, k in losses.values()), 1)
    unscored = _account(loader.dataset.utts, refs, skipped)
    results = {}
    for name in decoders:
        totals, rows = _score(refs, hyps[name], SCORING[scoring], env.is_main)
        results[name] = (totals | unscored | {"loss": loss}, rows)  # loss: CTC per target token
    return results


def _account(utts: Sequence[Utterance], refs: dict[str, str], skipped: dict[str, str]) -> dict:
    """Every utterance not scored, with its reason: skipped by the dataset, a second one with an
    id already used (scores are keyed by id), or (a bug) never decoded -> totals entries."""
    rows, seen, where = [], set(), {}
    for u in utts:
        shown = isinstance(u.audio, str | ShardAudio)  # a path, "shard-00003.parquet row 7"
        audio = str(u.audio) if shown else f"<{type(u.audio).__name__}>"
        if u.id in seen:
            rows.append({"id": u.id, "reason": "duplicate id", "audio": audio})
        elif u.id not in refs:
            rows.append({"id": u.id, "reason": skipped.get(u.id, "not decoded"), "audio": audio})
        seen.add(u.id)
        where.setdefault(u.id, audio)
    counter = SkipCounter()
    counter.add((r["id"], r["reason"]) for r in rows)
    return {
        "skipped": counter.total,
        "skipped_by_reason": dict(counter.counts.most_common()),
        "skipped_first": [f"{i} ({where[i]})" for i in counter.first_ids],
        "skipped_utterances": rows,
    }


def skip_summary(totals: dict) -> str:
    """ "N of M utterances not scored: reason n, ... (first: id (audio), ...)"."""
    n, total = totals["skipped"], totals["skipped"] + totals["utterances"]
    reasons = ", ".join(f"{r} {k}" for r, k in totals["skipped_by_reason"].items())
    more = ", ..." if n > len(totals["skipped_first"]) else ""
    return f"{n} of {total} utterances not scored: {reasons} " + (
        f"(first: {', '.join(totals['skipped_first'])}{more})"
    )


def check_scored(totals: dict, name: str, allow_skips: bool) -> None:
    """ValueError when nothing was scored, or (unless `allow_skips`) anything was skipped."""
    if not totals["utterances"]:
        summary = skip_summary(totals) if totals["skipped"] else "it holds no utterance"
        raise ValueError(f"{name}: nothing to score, {summary}")
    if totals["skipped"] and not allow_skips:
        raise ValueError(
            f"{name}: {skip_summary(totals)}; fix or remove them, or pass allow_skips=true "
            "to score the rest"
        )


def _score(
    refs: dict[str, str], hyps: dict[str, str], transform, rows: bool
) -> tuple[dict, list[dict]]:
    """(totals, per-utterance rows if `rows`) of hypotheses against references, by id; WER and
    CER are NaN when there is nothing to score (0 % would claim a perfect model)."""
    ids = sorted(refs)
    totals = error_rates([refs[i] for i in ids], [hyps[i] for i in ids], transform)
    totals |= {"utterances": len(ids)}
    if not ids:
        totals |= {"wer": math.nan, "cer": math.nan}
    per_utt = []
    if rows:
        t = transform or (lambda s: s)
        for i in ids:
            ref, hyp = t(refs[i]), t(hyps[i])
            e = error_rates([ref], [hyp])
            per_utt.append(
                {"id": i, "ref": ref, "hyp": hyp, "word_errors": e["word_errors"],
                 "words": e["words"], "char_errors": e["char_errors"], "chars": e["chars"],
                 "alignment": alignment(ref, hyp)}
            )  # fmt: skip
    return totals, per_utt


def final_evaluation(
    cfg: Config, run_dir: Path, model: SpeechRecognizer, env: DistEnv, state, tracker, train_texts
) -> dict:
    """The best checkpoint on dev and test (and the demo corpus's unseen voices): greedy, and
    (trainer.final_lm) lexicon-constrained beam search with a word bigram LM built from the
    training transcripts.

    A finished run is not failed over bad dev/test utterances: they are counted ({split}_skipped
    in results.json, a warning, lines under the table in evaluation.txt), and a split with
    nothing scored gets null WER/CER."""
    if state.best_step >= 0 and state.best_step != state.step:
        model.load_state_dict(load_checkpoint(checkpoint_dir(run_dir, state.best_step))["model"])
    decoders = {"greedy": make_decoder("greedy")}
    if cfg.trainer.final_lm:
        if env.is_main:
            build_lm(train_texts, run_dir / "lm")
        distributed.barrier()
        lexicon, arpa = (str(run_dir / "lm" / name) for name in ("lexicon.txt", "words.arpa"))
        decoders["lm"] = make_decoder("beam", BeamConfig(beam_size=32, lexicon=lexicon, lm=arpa))
    results: dict = {"best_step": state.best_step}
    rows = []
    for split in ("dev", "test", "unseen") if has_unseen(cfg.data) else ("dev", "test"):
        loader = split_loader(cfg, split, env, train=False)[0]
        for name, (totals, _) in evaluate_decoders(model, loader, env, decoders).items():
            suffix = "" if name == "greedy" else f"_{name}"
            scored = totals["utterances"] > 0
            results |= {
                f"{split}_cer{suffix}": totals["cer"] if scored else None,
                f"{split}_wer{suffix}": totals["wer"] if scored else None,
            }
            rows.append((f"{split} {name}", totals))
        results[f"{split}_skipped"] = totals["skipped"]
        if totals["skipped"] and env.is_main:
            log.warning("final evaluation, %s: %s", split, skip_summary(totals))
    if env.is_main:
        table = format_table(rows)
        print(table, flush=True)
        (run_dir / "evaluation.txt").write_text(table + "\n")
    logged = {f"final/{k}": v for k, v in results.items() if v is not None and k != "best_step"}
    tracker.log(logged, state.step)
    return results


def format_table(rows: list[tuple[str, dict]]) -> str:
    """One line per scored set (utterances scored and skipped, words, WER, CER); under the
    table, for each set with skips, how many per reason and the first ones."""
    w = max([len(name) for name, _ in rows] + [5]) + 2
    lines = [f"{'scored':<{w}}{'utts':>7}{'skipped':>9}{'words':>8}{'WER':>9}{'CER':>9}"]
    notes = []
    for name, t in rows:
        rates = "".join(f"{t[k]:>9.2%}" if t["utterances"] else f"{'-':>9}" for k in ("wer", "cer"))
        skipped = t.get("skipped", 0)
        lines.append(f"{name:<{w}}{t['utterances']:>7}{skipped:>9}{t['words']:>8}{rates}")
        if skipped:
            notes.append(f"{name}: {skip_summary(t)}")
    return "\n".join(lines + notes)


def resolve_checkpoint(path: Path) -> Path:
    """A step folder, or a run directory (its best checkpoint, else its newest)."""
    if (path / "COMPLETE").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint at {path} (expected a run directory "
                                "or a checkpoints/step-XXXXXXXX folder)")  # fmt: skip
    state = TrainState()
    state.load_state_dict(load_checkpoint(latest)["train_state"])
    best = checkpoint_dir(path, state.best_step)
    return best if (best / "COMPLETE").exists() else latest


def load_model(path: Path, device: torch.device) -> tuple[SpeechRecognizer, dict]:
    """Model (eval mode) and the saved config sections from a checkpoint folder."""
    from lmu_asr.features import FeatureConfig
    from lmu_asr.model import ModelConfig, SpeechRecognizer

    ckpt = load_checkpoint(path)
    saved = ckpt["config"]
    model = SpeechRecognizer(
        ModelConfig(**saved["model"]), FeatureConfig(**saved["features"]), saved["sample_rate"]
    )
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), saved


def beam_config(dotlist: list[str]) -> BeamConfig:
    """["beam_size=8", "lm=x.arpa", ...] -> a validated BeamConfig (unknown keys refused)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(BeamConfig), OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        keys = ", ".join(f"beam.{k}" for k in BeamConfig.__dataclass_fields__)
        first = str(err).splitlines()[0]
        raise ValueError(f"bad beam option in {dotlist}: {first} (options: {keys})") from None


def main(argv: list[str] | None = None) -> None:
    from lmu_asr.launch import compose_config

    args = list(sys.argv[1:] if argv is None else argv)
    own = {"checkpoint": None, "split": None, "decoder": "greedy", "scoring": "plain"}
    own |= {"report": None, "allow_skips": "false"}
    overrides, beam_args = [], []
    for a in args:
        key, _, value = a.partition("=")
        if key in own:
            own[key] = value
        elif key.startswith("beam."):
            beam_args.append(a[5:])
        else:
            overrides.append(a)
    beam = beam_config(beam_args)
    if not own["checkpoint"]:
        sys.exit("usage: python -m lmu_asr.evaluate checkpoint=PATH [data=...] [split=test] ...")
    checks = {  # before the slow part: loading the model and the data
        "scoring": (own["scoring"], tuple(SCORING)),
        "allow_skips": (own["allow_skips"], ("true", "false")),
        "decoder": (own["decoder"], ("greedy", "beam")),
        "split": (own["split"], (None, *SPLITS)),
    }
    for key, (value, allowed) in checks.items():
        if value not in allowed:
            raise ValueError(f"{key} must be one of {[a for a in allowed if a]}, got {value!r}")
    ckpt = resolve_checkpoint(Path(own["checkpoint"]))
    env = distributed.env_from_environ()
    device = distributed.pick_device("auto", env)
    model, saved = load_model(ckpt, device)
    cfg = compose_config(overrides + [f"model.subsampling={saved['model']['subsampling']}"])
    # data=manifest scores data.manifest (the "train" slot) unless a split is named
    manifest = cfg.data.source == "manifest" and not own["split"]
    own["split"] = own["split"] or ("train" if manifest else "test")
    name = str(cfg.data.manifest) if manifest else f"{cfg.data.source} {own['split']}"
    loader, _ = split_loader(cfg, own["split"], env, train=False)
    totals, per_utt = evaluate_loader(
        model, loader, env, own["decoder"], beam, own["scoring"], progress=True
    )
    check_scored(totals, name, own["allow_skips"] == "true")
    print(format_table([(name, totals)]))
    report = Path(own["report"] or ckpt / f"eval-{own['split']}-{own['decoder']}.json")
    meta = {"checkpoint": str(ckpt), "scored": name, "split": own["split"]}
    meta |= {"decoder": own["decoder"], "scoring": own["scoring"], "data": asdict(cfg.data)}
    tmp = report.with_name(f".{report.name}.tmp")  # a failed write leaves an old report whole
    tmp.write_text(json.dumps({**meta, "totals": totals, "utterances": per_utt}, indent=2))
    os.replace(tmp, report)
    print(f"report: {report}")


def run_cli(main: Callable[[], None]) -> None:
    """Run a command-line entry point: expected errors (bad value or override, missing or broken
    file or checkpoint) print one line naming the problem instead of a traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        main()
    except (ValueError, OSError, CheckpointError, HydraException, OmegaConfBaseException) as err:
        sys.exit(f"error: {' '.join(str(err).split())}")


if __name__ == "__main__":
    run_cli(main)
