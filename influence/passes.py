"""The one loop every pass runs in: which rank runs which batch, rounds, partial saves, stops, resuming, the end.

A pass (covariance, Lambda, self-influence, one query batch's pairwise scores, and the pairwise pass over the
query batches) is described by a `Pass`: its data, the work on one batch, its running state and its result
files. `Loop.run` is the one place where ranks, resuming and the final save are handled:

- Batches before the saved progress are skipped (their sizes must match what was saved, else the pass starts
  over); the rest go round-robin to the ranks: in round r, rank k runs batch `first + r * world + k`.
- After each round the ranks meet (a `Saver`, which training uses too): every save_interval seconds they sum
  their shares of the state into rank 0, which saves it as the partial result; a stop asked by SIGTERM or SIGINT
  on any rank is acted on there: the state is saved the same way and interrupt.Interrupted raised.
- At the end the state is summed into rank 0, which writes the result files and removes the partial one.
- The partial result also keeps the pass's seconds so far, which a resumed pass adds to its profiler record: the
  timing table of a pass stopped and resumed counts every part's kept work (up to its last save).
- The result files of a named pass keep its seconds too (metadata SECONDS), for the timing table of a job that a
  stop cut after the pass had ended (see Analyzer.fit_all_factors).

A pass that is not split (the pairwise pass over query batches: every rank runs each query batch, whose own
pass over the training data is split) saves after every batch and leaves stops to the passes inside it. A pass
run inside another with the same partial file (a query batch's) saves its state there, under BLOCK, beside the
outer pass's state, and resumes from it.

States (factors.Sums, Columns, Rows) have tensors(), load(saved), reset(), start_at(examples) and
flush(group, examples), which sums the ranks' shares of the first `examples` into rank 0, and finite(): after
each batch, (names, one bool per name on the device) saying which of the state's layers are free of NaN and inf.
The loop reads a batch's flags one batch later, and before any save: a NaN or inf stops the pass in one line
naming the layer, before it reaches a file, and reading the flags late keeps the host from waiting for the
device after every batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

from influence import interrupt
from influence.capture import batch_length
from influence.distributed import Group
from influence.errors import InfluenceError
from influence.modules import Layer
from influence.profiler import Profiler
from influence.storage import Store, partial_path

ALL_MODULES = "all_modules"
SECONDS = "seconds"  # metadata key of a pass's result files: the seconds the pass took, every part's
BLOCK = "block/"  # prefix, in a pairwise partial file, of the columns of the query batch in progress
Files = list[tuple[Path, dict[str, torch.Tensor], dict[str, Any] | None]]


@dataclass
class Pass:
    """desc names the pass in messages; result: the file it ends in (its partial file is beside it);
    run_batch(index, offset, batch, count): this rank's work on batch number `index`, of `count` examples from
    example `offset`; finish(): rank 0's result files, from the reduced state; limit: at most this many examples."""

    desc: str
    data: Iterable[Any]
    state: Any
    result: Path
    run_batch: Callable[[int, int, Any, int], None] | None = None
    finish: Callable[[], Files] | None = None
    record: str | None = None  # the profiler's name for the pass, final save excluded
    save_record: str = "Save Partial Result"
    limit: int | None = None
    split: bool = True
    units: tuple[str, str] = ("batches", "examples")
    empty: str = ""  # the error when the data yields no batch (default: "<desc>: the dataset yielded no batch")


@dataclass
class _Run:
    job: Pass
    outer: _Run | None
    sizes: list[int] = field(default_factory=list)  # sizes of the batches done (known on every rank)
    block: tuple | None = None  # rank 0: the saved state of the pass that runs inside this one, when resuming
    unread: tuple | None = None  # (batch index, names, flags) of this rank's last batch, not yet read
    started: float = field(default_factory=time.monotonic)
    earlier: float = 0.0  # seconds of this pass that earlier, stopped runs spent on the work resumed from

    def progress(self) -> dict[str, Any]:
        """What a partial result keeps of this pass besides its state: the batches done and the seconds so far
        (its earlier runs' included)."""
        seconds = self.earlier + time.monotonic() - self.started
        return {"batches": len(self.sizes), "sizes": list(self.sizes), SECONDS: seconds}


class _Restart(Exception):
    """The saved partial result was made with other batches: the pass starts over."""


class Saver:
    """When a resumable loop saves what it has, at the points where its ranks meet (after each round of a pass,
    after each training step): every `interval` seconds, and at a stop asked by SIGTERM or SIGINT on any rank,
    after which interrupt.Interrupted is raised. `save()` saves (every rank its share, rank 0 writes) and says
    what and where. Used inside interrupt.polling(), so that signals wait for the next meeting."""

    def __init__(self, group: Group, interval: float, save: Callable[[], str]) -> None:
        self.group, self.interval, self.save = group, interval, save
        self.last = time.monotonic()

    def meet(self, may_save: bool = True) -> None:
        """Every rank, at the same point: save if rank 0's interval is up (and `may_save`), stop if a rank was asked."""
        wanted = may_save and time.monotonic() - self.last >= self.interval
        saving, stop = self.group.sync_round(wanted, interrupt.requested())
        if stop:
            self.stop(stop)
        if saving:
            self.save()
            self.last = time.monotonic()

    def stop(self, signum: int) -> NoReturn:
        """Save and raise Interrupted; rank 0's message says what was saved and where.

        The ranks wait for rank 0's write before any of them leaves: torchrun stops the remaining workers as soon
        as one exits with an error."""
        interrupt.note(signum)
        start = time.monotonic()
        saved = self.save()
        self.group.barrier()
        raise interrupt.stopped(signum, f"{saved} in {time.monotonic() - start:.2f} s")


class Loop:
    def __init__(
        self, group: Group, store: Store, profiler: Profiler, save_interval: float, disable_tqdm: bool
    ) -> None:
        self.group, self.store, self.profiler = group, store, profiler
        self.save_interval, self.disable_tqdm = save_interval, disable_tqdm
        self._running: list[_Run] = []

    def run(self, job: Pass) -> Files | None:
        """Run the pass to its end, resuming from its partial result; rank 0's result files (None elsewhere)."""
        around = self._running[-1] if self._running else None
        run = _Run(job, around if around is not None and around.job.result == job.result else None)
        self._running.append(run)
        try:
            with self.profiler.record(job.record) if job.record else contextlib.nullcontext():
                progress = self._resume(run)
                run.earlier = progress["seconds"]
                try:
                    sizes = self._batches(run, progress["batches"], progress["sizes"])
                except _Restart:
                    name = self._partial(job).name
                    self.store.log(f"{job.desc}: {name} was saved with other batches; starting the pass over")
                    job.state.reset()
                    run.block, run.earlier = None, 0.0
                    sizes = self._batches(run, 0, [])
                job.state.flush(self.group, sum(sizes))
            seconds = run.progress()[SECONDS]
            if job.record:
                self.profiler.credit(job.record, run.earlier)
        finally:
            self._running.pop()
        if job.finish is None:
            return None
        files = job.finish() if self.group.is_main else []
        if job.record:  # the pass's time, every part's, for the timing table of a job resumed after it (SECONDS)
            files = [(path, tensors, {**(meta or {}), SECONDS: seconds}) for path, tensors, meta in files]
        with self.profiler.record(job.save_record):
            self.store.save(files, done=job.result)
        return files if self.group.is_main else None

    @staticmethod
    def _partial(job: Pass) -> Path:
        return partial_path(job.result)

    def _resume(self, run: _Run) -> dict[str, Any]:
        job = run.job

        def use(tensors: dict[str, torch.Tensor], progress: dict[str, Any]) -> dict[str, Any]:
            done = {"batches": int(progress["batches"]), "sizes": [int(size) for size in progress["sizes"]]}
            seconds = progress.get("seconds", 0.0)  # absent from files saved before passes kept their time
            done["seconds"] = float(seconds) if isinstance(seconds, (int, float)) and seconds >= 0 else 0.0
            job.state.load({name: tensor for name, tensor in tensors.items() if not name.startswith(BLOCK)})
            inner = {name.removeprefix(BLOCK): tensor for name, tensor in tensors.items() if name.startswith(BLOCK)}
            run.block = (inner, progress["block"]) if isinstance(progress.get("block"), dict) else None
            return done

        saved: tuple | None | str = "read"
        if run.outer is not None:  # saved inside the outer pass's file, which that pass read: only its next batch
            saved, run.outer.block = run.outer.block, None
        progress = self.store.resume(self._partial(job), job.desc, use, saved)
        if progress is None:  # nothing saved, or it did not fit: whatever `use` loaded of it goes
            job.state.reset()
            run.block = None
            progress = {"batches": 0, "sizes": [], "seconds": 0.0}
        job.state.start_at(sum(progress["sizes"]))
        if progress["batches"] or run.block is not None:  # rank 0; also when only the inner pass had saved
            batches, things = job.units
            self.store.log(
                f"{job.desc}: resuming from {self._partial(job).name} after {progress['batches']} {batches} "
                f"({sum(progress['sizes'])} {things}) saved by an interrupted run"
            )
        return progress

    def _batches(self, run: _Run, first: int, done: list[int]) -> list[int]:
        job = run.job
        world, rank = (self.group.world, self.group.rank) if job.split else (1, 0)
        sizes = run.sizes = []
        run.unread = None
        offset = 0
        saver = Saver(self.group, self.save_interval, lambda: self._save(run))
        total = len(job.data) if hasattr(job.data, "__len__") else None
        bar = tqdm(desc=job.desc, total=total, initial=first, disable=self.disable_tqdm, leave=not job.split)
        stoppable = interrupt.polling() if job.split else contextlib.nullcontext()
        with bar, stoppable:
            for index, batch in enumerate(job.data):
                size = batch_length(batch)
                count = size if job.limit is None else max(0, min(size, job.limit - offset))
                if count == 0:
                    break
                if index < first:
                    if index >= len(done) or done[index] != count:
                        raise _Restart
                elif (index - first) % world == rank:
                    job.run_batch(index, offset, batch, count)
                    flags = job.state.finite()
                    self._check(run)  # the previous batch's flags: this batch's work is queued meanwhile
                    run.unread = (index, *flags) if flags is not None else None
                offset += count
                sizes.append(count)
                if index < first:
                    continue
                bar.update(1)
                if not job.split:
                    self._save(run)
                elif (index - first) % world == world - 1:
                    saver.meet()
        self._check(run)
        if first > len(sizes):
            raise _Restart
        if not sizes:
            raise InfluenceError(job.empty or f"{job.desc}: the dataset yielded no batch")
        return sizes

    @staticmethod
    def _check(run: _Run) -> None:
        """Stop the pass, naming the layers, when this rank's last unread batch left NaN or inf in its state."""
        if run.unread is None:
            return
        index, names, flags = run.unread
        run.unread = None
        if bool(flags.all()):  # the one host-device sync of the check, per batch
            return
        # A state may hold several sums per layer (covariances of a and g): each layer is named once.
        bad = list(dict.fromkeys(name for name, finite in zip(names, flags.tolist(), strict=True) if not finite))
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise InfluenceError(
            f"{run.job.desc}: NaN or inf in {', '.join(bad[:3])}{more} at batch {index + 1}: the model's outputs "
            "or gradients there are not finite (check its weights, inputs and loss), or the damping is 0 where the "
            "curvature is 0; the pass stopped before "
            "saving them"
        )

    def _save(self, run: _Run) -> str:
        """Every rank's share of the state onto rank 0, which saves it with the progress; returns what and where."""
        job, sizes = run.job, run.sizes
        self._check(run)
        job.state.flush(self.group, sum(sizes))
        tensors, progress = job.state.tensors(), run.progress()
        if run.outer is not None:
            outer = run.outer
            tensors = {**outer.job.state.tensors(), **{f"{BLOCK}{name}": t for name, t in tensors.items()}}
            progress = {**outer.progress(), "block": progress}
        with self.profiler.record("Save Partial Result"):
            self.store.save_partial(self._partial(job), tensors, progress)
        return f"{job.desc} after {len(sizes)} {job.units[0]} ({sum(sizes)} {job.units[1]}) to {self._partial(job)}"


class Columns:
    """Score columns of the training examples: all modules summed (and each module, when asked).

    Each rank keeps the columns of the batches it ran since the last flush; a flush sums the ranks' columns into
    rank 0 (zeros where a rank did not run a batch, so the sum is exact), which appends them to the columns done.
    """

    def __init__(
        self, layers: list[Layer], per_module: bool, lead: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.layers = [layer.name for layer in layers]
        self.names = [ALL_MODULES] + (self.layers if per_module else [])
        self.per_module, self.lead, self.dtype, self.device = per_module, lead, dtype, device
        self.reset()

    def reset(self) -> None:
        self.done = {name: torch.zeros(*self.lead, 0, dtype=self.dtype, device=self.device) for name in self.names}
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.current: dict[str, list[torch.Tensor]] = {}
        self.flags: tuple[list[str], torch.Tensor] | None = None  # the last batch's, until finite() hands them over
        self.flushed = 0  # examples whose columns are on rank 0 (known to every rank)

    def start_at(self, examples: int) -> None:
        """A resumed pass: the columns of the first `examples` came from the partial result (on rank 0)."""
        self.flushed = examples

    def add(self, module: str, part: torch.Tensor) -> None:
        """A chunk of consecutive examples of the current batch, for one module."""
        self.current.setdefault(module, []).append(part)

    def end_batch(self, offset: int) -> None:
        per_module = {name: torch.cat(parts, dim=-1) for name, parts in self.current.items()}
        if per_module:  # per module, not on the sum, so that a NaN is traced to its layer; in the model's order
            names = [name for name in self.layers if name in per_module]
            finite = torch.stack([torch.isfinite(per_module[name]).all() for name in names])
            self.flags = ([f"module {name!r}" for name in names], finite)
        batch = {ALL_MODULES: sum(per_module.values())}
        if self.per_module:
            batch.update(per_module)
        self.pending.append((offset, batch))
        self.current = {}

    def finite(self) -> tuple[list[str], torch.Tensor] | None:
        """Which modules' scores of the last batch are free of NaN and inf (see the module's docstring)."""
        flags, self.flags = self.flags, None
        return flags

    def flush(self, group: Group, examples: int) -> None:
        """Columns up to example `examples` (a prefix every rank has finished) onto rank 0."""
        start, self.flushed = self.flushed, examples
        new = {
            name: torch.zeros(*self.lead, examples - start, dtype=self.dtype, device=self.device) for name in self.names
        }
        for offset, batch in self.pending:
            for name, part in batch.items():
                new[name][..., offset - start : offset - start + part.shape[-1]] = part
        self.pending = []
        group.sum_to_main(list(new.values()))
        if group.is_main:
            self.done = {name: torch.cat([self.done[name], new[name]], dim=-1) for name in self.names}

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.done

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        if set(saved) != set(self.names) or any(saved[n].shape[:-1] != self.done[n].shape[:-1] for n in self.names):
            raise KeyError("columns")
        self.done = {name: saved[name].to(self.device, self.dtype) for name in self.names}

    def result(self) -> dict[str, torch.Tensor]:
        """Float32 on the CPU, or float64 for a float64 model."""
        out = torch.float64 if self.dtype == torch.float64 else torch.float32
        return {name: tensor.to("cpu", out) for name, tensor in self.done.items()}


class Rows:
    """Rows of pairwise scores, a query batch's block at a time, on rank 0's CPU (every rank computes each block
    whole, so there is nothing to reduce)."""

    def __init__(self, names: list[str], partial: Path) -> None:
        self.names, self.partial = names, partial
        self.reset()

    def reset(self) -> None:
        self.rows: dict[str, torch.Tensor] = {}

    def start_at(self, examples: int) -> None:
        pass

    def flush(self, group: Group, examples: int) -> None:
        pass

    def finite(self) -> None:
        """Nothing to check: each block comes from a pass over the training data, which checked its columns."""
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.rows

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        if saved and set(saved) != set(self.names):
            raise KeyError("rows")
        self.rows = dict(saved)

    def add(self, block: dict[str, torch.Tensor]) -> None:
        if self.rows and any(self.rows[name].shape[1] != block[name].shape[1] for name in block):
            raise InfluenceError(f"{self.partial} holds scores of another number of training examples: delete it")
        self.rows = {name: torch.cat([self.rows[name], part]) if self.rows else part for name, part in block.items()}
