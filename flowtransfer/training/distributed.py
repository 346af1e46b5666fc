"""Multi-process training with ``torch.distributed``.

Launch a script with ``torchrun --nproc_per_node N script.py``; torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. The script calls
:func:`init_distributed` once, then builds a :class:`~flowtransfer.training.Trainer` as usual: the
trainer sees the process group and switches to DistributedDataParallel (DDP), a sharded sampler, and
rank-0-only file writes. Without those variables everything runs as one process.

Backend: ``nccl`` when CUDA is available, ``gloo`` on CPU.

Example::

    ctx = init_distributed()
    trainer = Trainer(method, TrainConfig(epochs=10))
    result = trainer.fit(train_ds, valid_ds)
    if is_main_process():
        write_results(rows, "out")
    cleanup_distributed()
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "init_distributed",
    "current_context",
    "is_main_process",
    "cleanup_distributed",
    "barrier",
    "broadcast_object",
    "all_gather_objects",
    "weighted_means",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a (possibly single-process) job.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes; 1 means no process group.
        local_rank: rank on this machine (selects the CUDA device).
        backend: ``"gloo"``, ``"nccl"`` or ``None`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from err


def current_context() -> DistributedContext:
    """The context of the initialised process group, or a single-process context."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=_env_int("LOCAL_RANK", dist.get_rank()),
            backend=str(dist.get_backend()),
        )
    return DistributedContext()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group that torchrun describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and, through ``init_method="env://"``,
    ``MASTER_ADDR``/``MASTER_PORT``). With ``WORLD_SIZE`` unset or 1 it returns a single-process
    context and starts nothing. Calling it again after the group exists returns the same context.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``"nccl"`` if CUDA is available, else ``"gloo"``.
        timeout_s: collective-operation timeout.
    """
    if dist.is_available() and dist.is_initialized():
        return current_context()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank = _env_int("RANK", -1)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, {world_size}) when WORLD_SIZE={world_size}, got {rank}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"{name} is not set: launch with torchrun or set it for env:// rendezvous")
    local_rank = _env_int("LOCAL_RANK", rank)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def is_main_process() -> bool:
    """True on rank 0 or when no process group exists."""
    return current_context().is_main


def cleanup_distributed() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if current_context().is_distributed:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects; returns ``obj`` when single)."""
    if not current_context().is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (``[obj]`` for a single process)."""
    ctx = current_context()
    if not ctx.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def weighted_means(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    """``sum_r sums_r[k] / sum_r counts_r[k]`` per key, over every rank (this rank alone if single).

    Ranks may log different keys (a loss part that only some batches produce); each key is
    averaged over the samples that logged it. Collective under DDP: every rank must call it.
    """
    gathered = all_gather_objects((dict(sums), dict(counts)))
    total_s: dict[str, float] = {}
    total_c: dict[str, float] = {}
    for rank_sums, rank_counts in gathered:
        for key, value in rank_sums.items():
            total_s[key] = total_s.get(key, 0.0) + float(value)
            total_c[key] = total_c.get(key, 0.0) + float(rank_counts.get(key, 0.0))
    return {k: (total_s[k] / total_c[k] if total_c[k] > 0 else float("nan")) for k in total_s}
