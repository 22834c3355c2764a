"""Batches of utterances: collate, the length-bucketed distributed sampler, the loader, and the
skip counter. Re-exported by `lmu_asr.data`, which is where callers import them from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset


@dataclass
class Batch:
    wav: torch.Tensor  # (B, S) float32, right-padded with zeros
    wav_lens: torch.Tensor  # (B,) long
    tokens: torch.Tensor  # (B, L) long, padded with blank (0)
    token_lens: torch.Tensor  # (B,) long
    ids: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason), B may be 0

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = {"device": device, "non_blocking": non_blocking}
        return replace(
            self,
            wav=self.wav.to(**move),
            wav_lens=self.wav_lens.to(**move),
            tokens=self.tokens.to(**move),
            token_lens=self.token_lens.to(**move),
        )

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        tensors = ("wav", "wav_lens", "tokens", "token_lens")
        return replace(self, **{name: getattr(self, name).pin_memory() for name in tensors})


def collate(items: Sequence) -> Batch:
    """Pad the decoded items of one batch; skipped ones (they have a `reason`) are listed."""
    kept = [item for item in items if not hasattr(item, "reason")]
    skipped = [(item.id, item.reason) for item in items if hasattr(item, "reason")]
    if not kept:
        empty = torch.zeros(0, 0, dtype=torch.long)
        no_lens = torch.zeros(0, dtype=torch.long)
        return Batch(torch.zeros(0, 0), no_lens, empty, no_lens.clone(), [], skipped)
    return Batch(
        wav=pad_sequence([item.wav for item in kept], batch_first=True),
        wav_lens=torch.tensor([len(item.wav) for item in kept], dtype=torch.long),
        tokens=pad_sequence([item.tokens for item in kept], batch_first=True),
        token_lens=torch.tensor([len(item.tokens) for item in kept], dtype=torch.long),
        ids=[item.id for item in kept],
        skipped=skipped,
    )


class BucketBatchSampler:
    """Batches of similar-length utterances with B * max_len <= max_frames, in an order shuffled
    per epoch from (seed, epoch), sharded over ranks. Every rank gets the same number of batches
    (the last ones are repeated to pad); `set_epoch(epoch, skip)` resumes mid-epoch.

    With `shards` (the shard of each utterance, `data=prepared`), batches never mix shards: the
    shards come in an order shuffled per epoch, each one's batches shuffled among themselves,
    and each rank takes a contiguous block of that list, so it reads its own rows of about
    1/world_size of the shards. Without, rank r takes every world_size-th batch."""

    def __init__(
        self,
        lengths: Sequence[int],
        max_frames: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        shards: Sequence[int] | None = None,
    ) -> None:
        if max_frames <= 0:
            raise ValueError(f"max_frames must be > 0, got {max_frames}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) and self.lengths.min() < 1:
            raise ValueError(f"utterance {int(self.lengths.argmin())} has no frames")
        if len(self.lengths) and self.lengths.max() > max_frames:
            i = int(self.lengths.argmax())
            raise ValueError(
                f"utterance {i} has {self.lengths[i]} frames, more than max_frames={max_frames}: "
                "raise max_frames or drop it (data.max_duration)"
            )
        self.max_frames, self.seed, self.shuffle = max_frames, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.shard_rows: list[np.ndarray] | None = None  # utterance indices of each shard
        if shards is not None:
            shards = np.asarray(shards)
            if len(shards) != len(self.lengths):
                raise ValueError(f"{len(shards)} shard numbers for {len(self.lengths)} utterances")
            order = np.argsort(shards, kind="stable")
            starts = np.flatnonzero(np.diff(shards[order], prepend=-1))
            self.shard_rows = np.split(order, starts[1:]) if len(order) else []
        self.epoch, self.skip = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate epoch `epoch`, leaving out this rank's first `skip` batches (already used)."""
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.epoch, self.skip = epoch, skip

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (lists of utterance indices) of `epoch`, none skipped."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._make_batches(epoch))
        return self._cached[1]

    def _make_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.shard_rows is None:  # strided over ranks: each sees the whole range of lengths
            batches = self._bucket(np.arange(len(self.lengths)), rng)
            return self._even(batches)[self.rank :: self.world_size]
        n_shards = len(self.shard_rows)
        order = rng.permutation(n_shards) if self.shuffle else range(n_shards)
        batches = self._even([b for j in order for b in self._bucket(self.shard_rows[j], rng)])
        n = len(batches) // self.world_size  # contiguous blocks: each rank reads its own shards
        return batches[self.rank * n : (self.rank + 1) * n]

    def _even(self, batches: list[list[int]]) -> list[list[int]]:
        """`batches`, repeated from the first up to a multiple of world_size: ranks step equally."""
        pad = -len(batches) % self.world_size if batches else 0
        return batches + [batches[j % len(batches)] for j in range(pad)]

    def _bucket(self, indices: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """`indices` packed into batches of similar length, shuffled when training."""
        key = self.lengths[indices].astype(np.float64)
        if self.shuffle:  # +-5% jitter varies which utterances share a batch from epoch to epoch
            key = key * rng.uniform(0.95, 1.05, size=len(key))
        batches, current, longest = [], [], 0
        for i in indices[np.argsort(key, kind="stable")].tolist():
            longest_with_i = max(longest, int(self.lengths[i]))
            if current and (len(current) + 1) * longest_with_i > self.max_frames:
                batches.append(current)
                current, longest_with_i = [], int(self.lengths[i])
            current.append(i)
            longest = longest_with_i
        if current:
            batches.append(current)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank, as if none were skipped."""
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch)[self.skip :])

    def __len__(self) -> int:
        return max(0, self.num_batches - self.skip)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "skip": self.skip,
            "seed": self.seed,
            "world_size": self.world_size,
            "max_frames": self.max_frames,
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        skip = state["skip"]
        if state.get("world_size", self.world_size) != self.world_size:
            # Another world size shards differently: resume near the same fraction of the epoch.
            skip = skip * state["world_size"] // self.world_size
        self.set_epoch(state["epoch"], skip)


def make_loader(
    dataset: Dataset, sampler: BucketBatchSampler, num_workers: int, pin_memory: bool | None = None
) -> DataLoader:
    """DataLoader over `sampler`'s batches. Workers are started once (persistent; the batch
    sampler itself runs in this process, so each epoch still sees its epoch and skip) from a
    fork server rather than forked from the trainer: a fork of a multi-GB training process makes
    every page the trainer then writes a copy-on-write fault, which slowed each epoch's start."""
    workers = {}
    if num_workers:
        workers = {"persistent_workers": True, "multiprocessing_context": "forkserver"}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # its own generator: creating an iterator must not draw from the global RNG, or a run
        # resumed mid-epoch would see different dropout/SpecAugment draws than a straight one
        generator=torch.Generator(),
        **workers,
    )


class SkipCounter:
    """Accumulates `Batch.skipped` (counts per reason and the first few ids) for a log line."""

    def __init__(self, max_ids: int = 5) -> None:
        self.max_ids = max_ids
        self.counts: Counter[str] = Counter()
        self.first_ids: list[str] = []

    def add(self, skipped: Batch | Iterable[tuple[str, str]]) -> None:
        for utt_id, reason in skipped.skipped if isinstance(skipped, Batch) else skipped:
            self.counts[reason] += 1
            if len(self.first_ids) < self.max_ids and utt_id not in self.first_ids:
                self.first_ids.append(utt_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 utterances"
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.counts.most_common())
        more = ", ..." if self.total > len(self.first_ids) else ""
        return (
            f"skipped {self.total} utterances: {reasons} (first: {', '.join(self.first_ids)}{more})"
        )

    def reset(self) -> None:
        self.counts.clear()
        self.first_ids.clear()
