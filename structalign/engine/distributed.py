"""Process-group set-up for one process or `torchrun` (NCCL on GPUs, gloo on CPU), with every wait for the other ranks
bounded by one timeout.

Under torchrun the workers meet in a TCP store that the agent hosts and keeps for the whole run: the workers of a
restarted group find there the keys of the group they replace (gloo's peer addresses among them), and torch names no
attempt in them. Read before the new ranks overwrite them, those keys send gloo's connectFullMesh to the dead workers'
ports ("Connection refused") or leave a pair waiting. TORCHELASTIC_RESTART_COUNT cannot name the attempt either: each
agent counts its own restarts, and agents restarted by another node's failure do not count it. So the ranks first
agree on a namespace of the store that no earlier attempt wrote into (`_fresh_namespace`), then build the group there.
"""
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from structalign.engine.config import ConfigError
from structalign.errors import StructalignError

LEADER_KEY = "structalign/namespace"  # the namespace rank 0 opened last (possibly by a dead attempt)


class DistributedError(StructalignError):
    """A rank cannot reach the others: the rendezvous failed, or a collective failed or timed out (a rank died, hangs
    or was stopped)."""


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


def _appears(store: dist.Store, key: str, seconds: float) -> bool:
    """Whether key exists in store within the given seconds."""
    until = time.monotonic() + seconds
    while not store.check([key]):
        if time.monotonic() > until:
            return False
        time.sleep(0.02)
    return True


def _fresh_namespace(store: dist.Store, rank: int, world: int, timeout: timedelta) -> dist.PrefixStore:
    """The part of store that only this attempt's ranks write into.

    Rank 0 opens it under a new random name. Every other rank posts a token of its own under the name it reads and
    waits for rank 0 to acknowledge that token: rank 0 only acknowledges tokens posted under its name, so a rank that
    read a dead attempt's name gets no answer and reads the name again.
    """
    if rank == 0:
        name = uuid.uuid4().hex
        store.set(LEADER_KEY, name)
        joined = [f"structalign/{name}/joined/{r}" for r in range(1, world)]
        store.wait(joined, timeout)
        for key in joined:
            store.set(f"structalign/{name}/welcome/{store.get(key).decode()}", "")
        return dist.PrefixStore(f"structalign/{name}/", store)
    token, deadline = uuid.uuid4().hex, time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        name = store.get(LEADER_KEY).decode()
        store.set(f"structalign/{name}/joined/{rank}", token)
        if _appears(store, f"structalign/{name}/welcome/{token}", 1.0):
            return dist.PrefixStore(f"structalign/{name}/", store)
    raise TimeoutError("rank 0 never acknowledged this rank")


def _reason(exc: BaseException) -> str:
    """The first sentence of a torch/gloo error, without gloo's [source:line] prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).strip() or type(exc).__name__).splitlines()[0])
    return text.split(". ")[0].rstrip(".")


def setup_distributed(requested_device: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), or run as a
    single process. timeout_s bounds the rendezvous and every collective of the group; a rank that cannot reach the
    others raises DistributedError.

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
    timeout = timedelta(seconds=timeout_s)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout, rank=rank,
                                world_size=world, store=_fresh_namespace(store, rank, world, timeout),
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, TimeoutError) as exc:  # torch's DistError types are RuntimeErrors
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise DistributedError(f"rank {rank} of {world}: cannot form the process group with the other ranks at "
                               f"{where} within train.dist_timeout_s={timeout_s:g} s ({_reason(exc)})") from None
    return DistEnv(rank, world, local_rank, device, owns_group=True)


def lost_contact(exc: BaseException) -> DistributedError | None:
    """The one-line error for an exception of a collective that failed or timed out (gloo's errors are plain
    RuntimeErrors naming its sources; NCCL's and the store's are DistErrors); None for any other exception."""
    if not isinstance(exc, dist.DistError) and "/gloo/" not in str(exc):
        return None
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    return DistributedError(f"rank {rank} of {world} lost contact with the other ranks ({_reason(exc)}): a rank died, "
                            f"hangs or was stopped; under torchrun --max-restarts the group restarts, and --resume "
                            f"auto continues from the last checkpoint")


def teardown_distributed(env: DistEnv, synchronise: bool = True) -> None:
    """Destroy the group setup_distributed created; synchronise: wait first (bounded by the group's timeout) for every
    rank's pending collectives (False after a failure: the other ranks may be gone)."""
    if env.owns_group and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in a single process)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's buffers of module (BatchNorm statistics) on every rank: DDP sends them at the start of each forward, and
    each rank's own batch then updates its copy (a collective under DDP)."""
    if env.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def from_main(value, env: DistEnv):
    """Rank 0's value (a picklable object) on every rank (a collective under DDP)."""
    if not env.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
