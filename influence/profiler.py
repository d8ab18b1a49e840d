"""Wall-clock time (and counted FLOPs) per action, synchronised with the device so GPU work is timed where it runs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from influence import flops, stages

_WIDTHS = (29, 21, 21, 21, 21)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Profiler:
    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled, self.device = enabled, device
        self.records: dict[str, list[float]] = {}
        self.flops: dict[str, dict[flops.Precision, int]] = {}  # per action, per precision (see influence.flops)
        self.stages: dict[str, dict[str, tuple[float, dict]]] = {}  # per action, when stages are timed (see stages)

    @contextmanager
    def record(self, action: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        start, counted, staged = time.perf_counter(), flops.read(), stages.read()
        yield
        synchronize(self.device)
        self.records.setdefault(action, []).append(time.perf_counter() - start)
        totals = self.flops.setdefault(action, {})
        for dtype, count in flops.since(counted).items():
            totals[dtype] = totals.get(dtype, 0) + count
        parts = self.stages.setdefault(action, {})
        for name, (seconds, counts) in stages.since(staged).items():
            seconds_before, counts_before = parts.get(name, (0.0, {}))
            merged = {key: counts_before.get(key, 0) + counts.get(key, 0) for key in {*counts_before, *counts}}
            parts[name] = (seconds_before + seconds, merged)

    def credit(self, action: str, seconds: float) -> None:
        """Add `seconds` to the last record of `action`: the time earlier, stopped runs spent on a resumed pass."""
        if self.enabled and seconds > 0 and self.records.get(action):
            self.records[action][-1] += seconds

    def earlier(self, action: str, seconds: float) -> None:
        """Record `action` as one call of `seconds`: work an earlier, stopped run of the same job finished."""
        if self.enabled:
            self.records.setdefault(action, []).append(seconds)

    def table(self) -> str:
        """The timing table in the original example's format, longest action first."""
        total = sum(sum(times) for times in self.records.values())
        calls = sum(len(times) for times in self.records.values())
        rule = "-" * 130

        def row(*cells: str) -> str:
            return "".join(f"|  {cell:<{width}}" for cell, width in zip(cells, _WIDTHS, strict=True)) + "|"

        lines = [rule, row("Action", "Mean duration (s)", "Num calls", "Total time (s)", "Percentage %"), rule]
        lines += [row("Total", "-", str(calls), f"{total:.5g}", "100 %"), rule]
        for action, times in sorted(self.records.items(), key=lambda item: -sum(item[1])):
            spent = sum(times)
            share = 100 * spent / total if total > 0 else 0.0
            lines.append(row(action, f"{spent / len(times):.5g}", str(len(times)), f"{spent:.5g}", f"{share:.5g}"))
        lines.append(rule)
        return "\n".join(lines)
