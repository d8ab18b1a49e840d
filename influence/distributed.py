"""Several processes (torchrun): which batches are this rank's, sums reduced to rank 0, rank 0 alone on the disk.

Without an initialised process group every method is a no-op on one process, so the engine has one code path.
With one, the engine's passes run in rounds: in round r, rank k runs batch `first + r * world + k`; after each
round the ranks meet in one small collective (on a gloo group, so it never waits on a GPU), which is where rank 0
decides to save a partial result and where a rank that stopped is noticed. Sums (covariances, Lambda, counts) and
score columns are summed into rank 0 (columns of other ranks are zeros there, so the sum is exact); rank 0 reads
and writes every file, and what it read is broadcast to the others. Objects cross processes as JSON and tensors,
never as pickles.

Which wire each collective takes (see `route`): the small meetings always go through gloo on the CPU; sums and
shared tensors go through nccl when the model is on a GPU and the job's group is nccl, and through gloo otherwise
(nccl moves only CUDA tensors: a model kept on the CPU under an nccl job, as a benchmark of the CPU on a GPU
host does, reduces through gloo).

A rank that fails leaves a note in the rendezvous store (see `publish_failure`) and exits; the collective the
others are waiting in then fails (at once when the process is gone, after the process group's timeout when it
hangs), and they stop with an error naming it. gloo blocks the host in every collective, so this holds at any
collective. nccl does not block the host: a peer that died leaves the others waiting on the GPU until nccl's
watchdog ends them, without that line. So every group of nccl collectives is preceded by a gloo meeting (sums: a
barrier; shared tensors: the broadcast of their description), where a rank that stopped is noticed as with gloo;
only a rank that dies inside the nccl collectives themselves is left to the watchdog (after the process group's
timeout).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from influence.errors import InfluenceError, first_line

T = TypeVar("T")
FAILURE_KEY = "influence/failed"

# Set through remember_store() by the program that initialises torch.distributed, so that failing ranks are named;
# without it the other ranks still stop, without the failing rank's message.
_store: dist.Store | None = None
_timeout: timedelta | None = None
_control_groups: dict[Any, Any] = {}


def forget_groups() -> None:
    """Drop the groups and the store this module holds, before the process group is destroyed, so that none of
    them outlives it into the interpreter's teardown."""
    global _store
    _control_groups.clear()
    _store = None


def remember_store(store: dist.Store | None, timeout: timedelta | None = None) -> None:
    global _store, _timeout
    _store, _timeout = store, timeout


def active() -> bool:
    """Whether this process is one of several (an initialised process group of two or more)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def this_rank() -> int:
    """This process's rank in the job: 0 for a process on its own. The one place the rank is read."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The processes of the job: 1 for a process on its own."""
    return dist.get_world_size() if active() else 1


def publish_failure(message: str) -> None:
    """Leave `rank r: message` where the other ranks look when a collective fails; never raises."""
    if _store is None or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        _store.set(FAILURE_KEY, f"rank {this_rank()}: {message}")
    except Exception:  # the store itself may be gone (rank 0 hosted it); the others still stop on their own
        pass


def _failure_note() -> str | None:
    if _store is None:
        return None
    try:
        if _store.check([FAILURE_KEY]):
            return _store.get(FAILURE_KEY).decode()
    except Exception:
        return "rank 0 (which holds the rendezvous store) is gone"
    return None


def route(backend: str, device: torch.device) -> tuple[torch.device, bool]:
    """(device the tensors of a sum or a broadcast travel on, whether they take the job's nccl group).

    nccl moves only CUDA tensors, and gloo reduces only CPU ones: a model on a GPU under nccl reduces on its GPU;
    anything else (gloo jobs, or a model left on the CPU under nccl) copies to the CPU and takes the gloo group."""
    if device.type == "cuda" and "nccl" in backend:
        return device, True
    return torch.device("cpu"), False


def control_group() -> Any:
    """The job's gloo group: the world group of a gloo job, otherwise one made once (a collective call, so every
    rank must reach it at the same point). gloo collectives block the host, so a rank that stopped is noticed."""
    key = dist.group.WORLD
    if key not in _control_groups:
        gloo = dist.get_backend() == "gloo"
        _control_groups[key] = dist.group.WORLD if gloo else dist.new_group(backend="gloo", timeout=_timeout)
    return _control_groups[key]


def balanced_owners(costs: list[float], world: int) -> list[int]:
    """A rank for each job, largest first to the least loaded rank (ties: lowest rank), so ranks finish together."""
    owners = [0] * len(costs)
    loads = [0.0] * world
    for job in sorted(range(len(costs)), key=lambda job: (-costs[job], job)):
        rank = min(range(world), key=lambda rank: (loads[rank], rank))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


class Group:
    """This process's view of the job: rank, world size, and the few collectives the engine needs.

    `alone`: this process by itself, whatever the job (a torchrun worker that trains a model of its own)."""

    def __init__(self, device: torch.device, alone: bool = False) -> None:
        self.device = device
        self.world, self.rank = (1, 0) if alone else (world_size(), this_rank())
        self.is_main = self.rank == 0
        self._control = None
        self._data = None  # the group sums and shared tensors take
        self._comm_device = torch.device("cpu")
        self._on_gpu_group = False
        if self.world > 1:
            self._control = control_group()  # every rank builds its Group at the same point
            self._comm_device, self._on_gpu_group = route(dist.get_backend(), device)
            self._data = dist.group.WORLD if self._on_gpu_group else self._control

    # ------------------------------------------------------------------ collectives

    def _collective(self, what: str, run: Callable[[], T]) -> T:
        try:
            return run()
        except RuntimeError as error:  # gloo and nccl report a lost peer or a timeout as RuntimeError subclasses
            note = _failure_note()
            if note:
                raise InfluenceError(f"stopping because {note}") from None
            raise InfluenceError(
                f"rank {self.rank} lost contact with the other processes during {what} "
                f"(another rank stopped or timed out; see its output): {first_line(error)}"
            ) from None

    def sync_round(self, main_wants_save: bool, stop: int | None = None) -> tuple[bool, int | None]:
        """End of a round: every rank learns whether rank 0 wants to save now, and the signal that asked any rank
        to stop (`stop`: this rank's, or None; see influence.interrupt), and notices a rank that stopped working."""
        if self.world == 1:
            return main_wants_save, stop
        flags = torch.tensor([int(main_wants_save and self.is_main), stop or 0], dtype=torch.int64)
        self._collective("a pass", lambda: dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._control))
        return bool(flags[0].item()), int(flags[1].item()) or None

    def sum_to_main(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks into rank 0's copy; the other ranks' copies are zeroed."""
        if self.world == 1:
            return
        if self._on_gpu_group:  # nccl does not block the host: meet on gloo first, where a stopped rank is noticed
            self.barrier()
        for tensor in tensors:
            moved = tensor.to(self._comm_device).contiguous()  # collectives work on the storage as laid out
            self._collective("a reduction", lambda moved=moved: dist.reduce(moved, dst=0, group=self._data))
            if self.is_main:
                if moved is not tensor:
                    tensor.copy_(moved)
            else:
                tensor.zero_()

    def share(self, value: T, device: torch.device | str | None = None) -> T:
        """Rank 0's value on every rank: None, JSON-able data, tensors, or dicts/lists of these.

        The other ranks receive tensors on `device` (default: this group's device)."""
        device = torch.device(device) if device is not None else self.device
        if self.world == 1:
            return value
        tensors: list[torch.Tensor] = []

        def skeleton(item: Any) -> Any:
            if isinstance(item, torch.Tensor):
                tensors.append(item)
                return {"__tensor__": [list(item.shape), str(item.dtype).removeprefix("torch.")]}
            if isinstance(item, dict):
                return {"__dict__": [[key, skeleton(val)] for key, val in item.items()]}
            if isinstance(item, (list, tuple)):
                return [skeleton(val) for val in item]
            return item

        text = json.dumps(skeleton(value)).encode() if self.is_main else b""
        size = torch.tensor([len(text)], dtype=torch.int64)
        self._collective("sharing results", lambda: dist.broadcast(size, src=0, group=self._control))
        if self.is_main:
            encoded = (
                torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
            )
        else:
            encoded = torch.empty(int(size.item()), dtype=torch.uint8)
        self._collective("sharing results", lambda: dist.broadcast(encoded, src=0, group=self._control))
        originals = iter(tensors)

        def rebuild(item: Any) -> Any:
            if isinstance(item, dict) and "__tensor__" in item:
                shape, dtype = item["__tensor__"]
                original = next(originals) if self.is_main else None
                if original is not None:
                    buffer = original.to(self._comm_device).contiguous()
                else:
                    buffer = torch.empty(shape, dtype=getattr(torch, dtype), device=self._comm_device)
                self._collective("sharing results", lambda: dist.broadcast(buffer, src=0, group=self._data))
                return original if original is not None else buffer.to(device)
            if isinstance(item, dict) and "__dict__" in item:
                return {key: rebuild(val) for key, val in item["__dict__"]}
            if isinstance(item, list):
                return [rebuild(val) for val in item]
            return item

        return rebuild(json.loads(bytes(encoded.numpy()).decode()))

    def on_main(self, fn: Callable[[], T], device: torch.device | str | None = None) -> T:
        """Run fn() on rank 0 only (file reads and writes); every rank gets its result (tensors on `device`, see
        share), or raises its error."""
        if self.world == 1:
            return fn()
        outcome: dict[str, Any] = {}
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = {"value": fn()}
            except InfluenceError as caught:
                outcome, error = {"error": str(caught)}, caught
            except Exception as caught:
                outcome, error = {"error": f"rank 0 failed: {type(caught).__name__}: {caught}"}, caught
        outcome = self.share(outcome, device)
        if error is not None:
            raise error
        if "error" in outcome:
            raise InfluenceError(outcome["error"])
        return outcome["value"]

    def barrier(self) -> None:
        if self.world > 1:
            self._collective("a barrier", lambda: dist.barrier(group=self._control))
