"""Process-group set-up for one process or `torchrun --nproc_per_node=N` (NCCL on GPUs, gloo on CPU)."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from structalign.engine.config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True when setup_distributed created the process group (and teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available (use train.device=auto or cpu)")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_distributed(requested_device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), or run as a single process.

    A group that the caller already initialised is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local_rank, _pick_device(requested_device, local_rank), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistEnv(0, 1, 0, _pick_device(requested_device, 0), owns_group=False)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(requested_device, local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                            else None)
    return DistEnv(rank, world, local_rank, device, owns_group=True)


def teardown_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.barrier()  # every rank's pending collectives finish before the group is destroyed
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in a single process)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor

