"""Who am I in the job: one small DistEnv read from the environment, and the few collectives the
trainer needs. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; in an srun step (submitit's
tasks, slurm/train.sbatch) we read SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID and rendezvous at
the step's first node on a port derived from the job id; otherwise it is one process."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_environ(environ: Mapping[str, str] | None = None) -> DistEnv:
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:  # torchrun, or set by hand
        return DistEnv(
            rank=int(e["RANK"]),
            local_rank=int(e.get("LOCAL_RANK", 0)),
            world_size=int(e["WORLD_SIZE"]),
            master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(e.get("MASTER_PORT", 29500)),
        )
    # Inside an srun step (submitit's tasks, slurm/train.sbatch). The batch script itself has no
    # SLURM_STEP_NUM_TASKS: python started there directly is one process, whatever --ntasks says.
    if int(e.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return DistEnv(
            rank=int(e["SLURM_PROCID"]),
            local_rank=int(e.get("SLURM_LOCALID", 0)),
            world_size=int(e["SLURM_STEP_NUM_TASKS"]),
            master_addr=e.get("MASTER_ADDR") or _slurm_master(e),
            master_port=int(e.get("MASTER_PORT") or slurm_port(int(e.get("SLURM_JOB_ID", 0)))),
        )
    return DistEnv()


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: jobs sharing a node differ in job id, hence in port
    (unless their ids are 20,000 apart), and the range stays below Linux's ephemeral ports."""
    return 10000 + job_id % 20000


def _slurm_master(e: Mapping[str, str]) -> str:
    """The step's first host; loopback when the step runs on one node (no name to resolve)."""
    if int(e.get("SLURM_STEP_NUM_NODES", "1")) == 1:
        return "127.0.0.1"
    nodelist = e["SLURM_STEP_NODELIST"]
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return out.stdout.split()[0]


def init(env: DistEnv, device: torch.device, timeout_min: float = 10.0) -> None:
    """Join the process group (NCCL on GPU, gloo on CPU); a no-op for one process."""
    if not env.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(minutes=timeout_min),
        device_id=device if device.type == "cuda" else None,
    )


def destroy(synchronize: bool = True) -> None:
    """Leave the process group. After a clean run every rank first waits for the others, so none
    tears its connections down while a peer still uses them; after an error nobody waits."""
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned (identity for one process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if `flag` is true on any rank: how all ranks agree at a step boundary."""
    return max_over_ranks([float(flag)], device)[0] > 0


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (identity for one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's `values`, in rank order (the same length on every rank)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    if not dist.is_initialized():
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def pick_device(name: str, env: DistEnv) -> torch.device:
    """auto -> this rank's GPU if there is one, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it and on CPUs with AMX (where bf16 matmuls are about
    1.5x faster for our models: `python -m lmu_asr.bench train`), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if _cpu_has_amx() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def set_threads(threads: int) -> int:
    """Intra-op threads: the config value, else SLURM_CPUS_PER_TASK, else torch's default.
    Several jobs sharing a node must not each take every core."""
    n = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0"))
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
