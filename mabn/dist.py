"""Distributed set-up from torchrun or SLURM environments; rank-0 helpers; metric reduction."""

from __future__ import annotations

import datetime
import gc
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place: rank, world size, local rank, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> tuple[int, int, int] | None:
    """(rank, world, local rank) from torchrun's variables, else from SLURM's (srun / submitit)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if env.get("SUBMITIT_EXECUTOR") == "slurm":  # a submitit job: its helper exports the rendezvous
            from submitit.helpers import TorchDistributedEnvironment

            slurm = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return slurm.rank, slurm.world_size, slurm.local_rank
        if "MASTER_ADDR" not in env:  # plain srun: the job's first host, a port derived from the job id
            hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], check=True,
                                   capture_output=True, text=True, timeout=60).stdout.split()
            env["MASTER_ADDR"] = hosts[0]
            env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 40000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def rank() -> int:
    """This process's rank: the process group's, else the launcher's environment (RANK), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def local_world_size() -> int:
    """Processes on this machine: torchrun's LOCAL_WORLD_SIZE, SLURM's tasks per node, else the world size."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    if "SLURM_NTASKS_PER_NODE" in env:  # e.g. "8" or "8(x2)"
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
    return dist.get_world_size() if dist.is_initialized() else 1


def info_from_process_group(device: str, local_world: int) -> DistInfo:
    """This process's DistInfo inside a process group someone else started (detectron2's launch)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    local = rank % local_world
    return DistInfo(rank, world, local, torch.device("cuda", local) if use_cuda else torch.device("cpu"))


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise the process group when launched by torchrun/SLURM (gloo on CPU, NCCL on GPU). ``timeout_s``
    (``train.dist_timeout_s``) bounds every collective: a rank that stalls or dies ends the job after it
    (``collective_timeout_message``), where gloo would wait 30 minutes and NCCL as its build says."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
        raise ValueError(f"train.dist_timeout_s must be a positive number of seconds, got {timeout_s!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    ranks = env_ranks()
    if ranks is None:
        return DistInfo(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    rank, world, local = ranks
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    TIMEOUT_S[0] = timeout_s
    return DistInfo(rank, world, local, torch.device("cuda", local) if use_cuda else torch.device("cpu"))


TIMEOUT_S = [600]  # the process group's collective timeout (train.dist_timeout_s), for the message below


def collective_timeout_message(err: BaseException) -> str | None:
    """One line for a collective that timed out on this rank (a stalled or dead peer), else None."""
    text = str(err)
    timed_out = any(key in text for key in ("Timed out", "timed out", "timeout"))
    # gloo: "[.../gloo/transport/tcp/...] Timed out waiting 600000ms for recv operation"; NCCL's watchdog:
    # "Watchdog caught collective operation timeout: WorkNCCL(...)"; a DataLoader's own timeout is neither
    collective = any(key in text for key in ("gloo", "NCCL", "Watchdog", "ProcessGroup", "collective"))
    if not (dist.is_available() and dist.is_initialized()) or not (timed_out and collective):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (f"rank {dist.get_rank()} of {dist.get_world_size()} waited train.dist_timeout_s={TIMEOUT_S[0]} s in a "
            f"collective and gave up: another rank stalled or died ({first[:200]}); rerun the command to resume "
            f"from the last checkpoint")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process groups while the interpreter is whole. detectron2 caches handles of them (its
    gather group, its local group); a group object still alive at interpreter shutdown can take gloo's
    worker threads down with it (SIGABRT, "terminate called without an active exception"), so those go too."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    comm = sys.modules.get("detectron2.utils.comm")
    if comm is not None:
        comm._get_global_gloo_group.cache_clear()
        comm.create_local_process_group.cache_clear()
        comm._LOCAL_PROCESS_GROUP = None
    gc.collect()
