"""torch.distributed in one place (the bottom floor, like detectron2's utils/comm.py): rank,
world size, gather / reduce, device choice, and joining the process group under torchrun.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); without them
everything here is a no-op and the run is a single process. NCCL on GPUs, gloo on CPUs.

    torchrun --nproc_per_node 8 -m proscale train ...                 # one machine, 8 GPUs
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m proscale train ...
    python -m torch.distributed.run --nproc_per_node 2 -m proscale train ... device=cpu   # CPU, gloo
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_object(obj: Any) -> list[Any]:
    """Returns [obj from rank 0, obj from rank 1, ...] on every rank ([obj] without dist)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Like all_gather_object but only `dst` receives the list (None elsewhere): for big payloads."""
    if not is_distributed():
        return [obj]
    rank = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_distributed created the process group (cleanup destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" gets the local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Joins the process group when launched by torchrun (idempotent); returns rank, world size
    and this process's device. CUDA processes are pinned to their local GPU."""
    if not launched_by_torchrun():
        return DistInfo(device=resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local_rank, dev, owns)


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leaves the process group if `init_distributed` created it (a caller's own group stays).
    No barrier: after an error on one rank the others may never reach it."""
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` when there are several processes, else `model`.
    Every parameter of MaskFormer takes part in the loss (the criterion keeps empty-target
    losses connected to the graph), so find_unused_parameters stays off unless a config
    freezes or skips parts."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_tensor(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum / max / mean of `t` over ranks (a new tensor on t's device)."""
    if not is_distributed():
        return t.clone()
    buf = t.detach().to(_comm_device()).clone()
    reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(buf, op=reduce_op)
    if op == "mean":
        buf /= dist.get_world_size()
    return buf.to(t.device)


def reduce_dict(values: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of a dict of floats (same keys on every rank), in one all_reduce."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    t = all_reduce_tensor(t, "mean")
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def add_threads_argument(parser) -> None:
    """`--threads N` for a command that runs models on the CPU."""
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default: torch's choice, one per core; under torchrun "
                             "give each process its share)")


def set_threads(n: int) -> None:
    """torch.set_num_threads(n) for n > 0; 0 leaves torch's default."""
    if n < 0:
        raise ValueError(f"--threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)
