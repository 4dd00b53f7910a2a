"""Data parallelism over the processes `torchrun` starts (one per core group or GPU).

    torchrun --nproc-per-node 2 -m bcllm eval --layers 10-19 --fit sequential ...

Each process (rank) runs the whole program on the whole model. The calibration statistics are
computed on this rank's share of the batches and summed over ranks, the gradients of block
reconstruction and distillation likewise (each rank its share of the rows), so every rank holds
the same fitted weights; only rank 0 writes files. Without torchrun
(no WORLD_SIZE in the environment) every function here is a no-op for one process: the run is
exactly the single-process run.

The process group is created on first use: gloo for CPU tensors, plus nccl for CUDA tensors where
each rank has a GPU of its own (else gloo for those too; BCLLM_DIST_BACKEND overrides). A rank
that waits longer than BCLLM_DIST_TIMEOUT seconds (default 7200: rank 0 may be writing a cache
while the others wait) for the others fails with a message saying so.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import os
import pickle

import torch
import torch.distributed as td

from .errors import InputError

TIMEOUT_S = 7200.0
_waits = {"timeout_s": None}  # the group's timeout, once created


class DistributedError(RuntimeError):
    """A collective failed: another rank raised, was killed, or did not arrive in time."""


def _active() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    """This process's rank; 0 alone (a launcher's RANK without WORLD_SIZE above 1 is no group)."""
    if _active():
        return td.get_rank()
    return int(os.environ.get("RANK", 0)) if world() > 1 else 0


def world() -> int:
    return td.get_world_size() if _active() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", rank())) if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    return float(os.environ.get("BCLLM_DIST_TIMEOUT", TIMEOUT_S))


def init(init_method: str | None = None, *, rank_id: int | None = None, world_size: int | None = None,
         timeout: float | None = None) -> bool:
    """Create the process group once (torchrun's environment, or the arguments: tests spawn their
    own processes with a file:// init_method); returns whether more than one process runs."""
    if _active():
        return world() > 1
    world_size = world() if world_size is None else world_size
    if world_size <= 1:
        return False
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:  # before any nccl call: each rank on its own GPU where there are enough (device_for)
        torch.cuda.set_device(local_rank() % gpus)
    # nccl needs a GPU per rank; gloo also sums CUDA tensors (several ranks sharing one GPU)
    own_gpu = gpus and gpus >= int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = os.environ.get("BCLLM_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if own_gpu else "gloo")
    _waits["timeout_s"] = timeout or timeout_s()
    td.init_process_group(backend, init_method=init_method or "env://", world_size=world_size,
                          rank=rank() if rank_id is None else rank_id,
                          timeout=datetime.timedelta(seconds=_waits["timeout_s"]))
    atexit.register(close)
    return True


def close() -> None:
    if _active():
        td.destroy_process_group()


def device_for(name: str) -> str:
    """`cuda` means this rank's GPU when several ranks run (LOCAL_RANK, wrapped around the GPUs)."""
    if name == "cuda" and world() > 1 and torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return name


def _collective(what: str, call):
    init()
    try:
        return call()
    except RuntimeError as e:  # gloo/nccl: a peer closed the connection, or the wait timed out
        raise DistributedError(f"bcllm rank {rank()} of {world()}: {what} failed ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}): another rank failed, was killed "
                               f"or did not arrive within {_waits['timeout_s'] or timeout_s():.0f} s (BCLLM_DIST_TIMEOUT); "
                               f"see its error") from e


def shard(items) -> list:
    """This rank's share of `items` (every world()-th one from rank(): deterministic, balanced over
    lists sorted by length); the list itself with one process. Every rank needs at least one."""
    items = list(items)
    if world() == 1:
        return items
    if len(items) < world():
        raise InputError(f"{len(items)} calibration batches for {world()} processes: each needs at least one "
                         f"(more samples, a smaller batch or fewer processes)")
    return items[rank()::world()]


def split_rows(batch: dict, rows_of: str = "input_ids") -> dict:
    """This rank's contiguous rows of one batch (the tensors whose first dimension is that of
    batch[rows_of]: samples, or token rows); the batch itself with one process. A rank may get no
    rows when the batch has fewer rows than there are processes."""
    if world() == 1:
        return batch
    n = batch[rows_of].shape[0]
    lo, hi = n * rank() // world(), n * (rank() + 1) // world()
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in batch.items()}


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place; returned."""
    if world() > 1:
        _collective("summing a tensor over ranks", lambda: td.all_reduce(tensor, op=td.ReduceOp.SUM))
    return tensor


def sum_gradients_(params: list) -> None:
    """Gradients summed over ranks in one message (each rank's are its share of the loss); a
    parameter without a gradient on some rank counts zero there."""
    if world() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in params]))
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def broadcast_(tensors) -> None:
    """Every rank's `tensors` (same shapes on all) set to rank 0's, in place."""
    if world() > 1:
        with torch.no_grad():  # parameters too
            for t in tensors:
                _collective("broadcasting rank 0's tensors", functools.partial(td.broadcast, t, 0))


def broadcast_object(obj):
    """Rank 0's `obj` (anything picklable) on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    _collective("broadcasting rank 0's object", lambda: td.broadcast_object_list(box, src=0))
    return box[0]


def barrier() -> None:
    """Wait until every rank is here (a sum of a CPU tensor: gloo, whatever the GPUs use)."""
    if world() > 1:
        _collective("waiting for the other ranks", lambda: td.all_reduce(torch.zeros(1), op=td.ReduceOp.SUM))


def _portable(error: Exception) -> Exception:
    """`error` as the other ranks can receive it: a copy where it pickles (an InputError stays one),
    else a DistributedError with its type and message."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return DistributedError(f"bcllm rank 0 failed: {type(error).__name__}: {error}")


def _main_outcome(error: Exception | None = None, value=None):
    """Rank 0's outcome of a block on every rank: its value, or (on the other ranks) its error raised
    at once, so that no rank waits for a rank 0 that has failed."""
    ok, got = broadcast_object(((error is None), value if error is None else _portable(error)) if is_main() else None)
    if not ok and not is_main():
        raise got
    return got


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it makes a cache), the others after it (they read that cache).
    When the block raises on rank 0, every rank raises its error."""
    if world() == 1:
        yield
        return
    if not is_main():
        _main_outcome()
        yield
        return
    try:
        yield
    except Exception as e:
        _main_outcome(e)
        raise
    _main_outcome()


def on_main(fn):
    """`fn` (a writer) runs on rank 0 only; the other ranks wait for it and get its return value,
    or raise its error."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if world() == 1:
            return fn(*args, **kwargs)
        if not is_main():
            return _main_outcome()
        try:
            value = fn(*args, **kwargs)
        except Exception as e:
            _main_outcome(e)
            raise
        return _main_outcome(value=value)
    return run
