"""A convolution's activation covariance A^T A from shifted products of its input, without patches.

Along each axis, kernel offset j of a convolution with stride s reads, for output position t, the input at
s * t + r with r = j * dilation - padding: the input's phase p = r mod s (every s-th row or column, from p) at
t + q, q = (r - p) / s. So the patches a hold, in the column block of offset j, a phase of the input shifted by
q, and the block of A^T A for offsets (j1, j2) is a sum of x_u x'_(u+e)^T over the positions u that offset j2
reads in its phase, with x' the phase offset j1 reads and e = q1 - q2. Blocks that share their two phases and
their shift e share their products, up to which positions they sum over. With stride 1 there is one phase and a
3x3 kernel has 13 shifts e >= 0 (in raster order) for the 45 blocks of the lower triangle: the products cost
2 * 13 * n * C^2 FLOPs for n input positions and C channels, against 81 * n * C^2 for the symmetric update of the
patches (9C columns). A 5x5 kernel with stride 2 reads 4 phases, each with a quarter of the positions, through
130 shifts for its 325 blocks: 2.1 times fewer FLOPs on ResNet-9's 32x32 input (2.5 but for the pad columns
each phase's rows carry and the edge columns' corrections). The patches, kh * kw copies of the input (over
s^2), are never gathered.

Which positions each block sums over is handled in two steps. Rows: the phases' rows are cut into segments at
every offset's first and last row read, so each offset reads whole segments. Columns: every offset reads all
columns of its phase but a few at the edges (one for a 3x3 kernel with padding 1), whose products are subtracted.

Each phase is laid out as [rows + pad rows, B, columns + pad columns, C], zero-filled, and flattened to rows of
C values, all phases alike: a shift e is then a constant offset in rows, so every product is a matrix product of
two slices of two such tensors (the columns as a strided slice), with no copy. The zero rows and columns take the
shifted positions that fall outside the input, which the convolution's zero padding reads as zeros.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from influence import flops
from influence.modules import Layer, conv_padding, input_patches

MIN_CHANNELS = 16  # below this, the per-shift products are too small to run at the matrix-product rate


@dataclass(frozen=True)
class Read:
    """What one kernel offset reads along one axis: the phase, the shift q of output position 0 in the phase's
    positions, and the positions [first, last) it reads there, clipped to the input."""

    phase: int
    shift: int
    first: int
    last: int


def _reads(size: int, kernel: int, dilation: int, stride: int, before: int, out: int) -> list[Read]:
    reads = []
    for j in range(kernel):
        phase, shift = (j * dilation - before) % stride, (j * dilation - before) // stride
        length = len(range(phase, size, stride))
        reads.append(Read(phase, shift, max(0, shift), max(0, min(length, shift + out))))
    return reads


def _inside(segment: tuple[int, int], read: Read) -> bool:
    return read.first <= segment[0] and segment[1] <= read.last


def _reads_column(read: Read, column: int) -> bool:
    return read.first <= column < read.last


@dataclass(frozen=True)
class Block:
    """A block of A^T A that a shift's products fill: the column blocks (k1 >= k2) of the offsets it stands for,
    what its base offset reads, and whether it is the products' transpose (base offset j1) or not (j2)."""

    k1: int
    k2: int
    read_y: Read
    read_x: Read
    base_is_j1: bool


@dataclass(frozen=True)
class Shift:
    """The products between the base phase at u and the shifted phase at u + e, e >= 0 in raster order (or e = 0
    and base <= shifted): the blocks they fill and the row segments and skipped columns they need."""

    base: tuple[int, int]  # (phase y, phase x)
    shifted: tuple[int, int]
    ey: int
    ex: int
    blocks: list[Block]
    segments: list[tuple[int, int]]  # the row segments some block's base offset reads
    columns: list[int]  # the columns (of the base phase) some block's base offset skips


@dataclass(frozen=True)
class Plan:
    """What add_shifted computes for one convolution and input size (see the module's docstring)."""

    reads_y: list[Read]  # per kernel offset along the height
    reads_x: list[Read]
    stride: tuple[int, int]
    rows: int  # the layout's rows per phase: the longest phase, then the pad rows the largest shift reaches
    run: int  # the layout's columns per (row, example): the widest phase, then the pad columns
    pad_columns: int  # also the layout's margin before and after, for shifts that reach left of column 0
    segments: list[tuple[int, int]]
    skipped: list[int]  # the columns some offset skips
    shifts: list[Shift]
    positions: int  # output positions per example


def _skipped(read: Read, width: int) -> list[int]:
    return [c for c in range(width) if not _reads_column(read, c)]


def plan(module: nn.Conv2d, height: int, width: int) -> Plan:
    top, bottom, left, right = conv_padding(module)
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    out_h = max((height + top + bottom - dh * (kh - 1) - 1) // sh + 1, 0)
    out_w = max((width + left + right - dw * (kw - 1) - 1) // sw + 1, 0)
    reads_y, reads_x = _reads(height, kh, dh, sh, top, out_h), _reads(width, kw, dw, sw, left, out_w)
    phase_rows, phase_columns = -(-height // sh), -(-width // sw)  # the longest phase along each axis
    pad_rows = max(r.shift for r in reads_y) - min(r.shift for r in reads_y)
    pad_columns = max(r.shift for r in reads_x) - min(r.shift for r in reads_x)
    widths = [len(range(p, width, sw)) for p in range(sw)]
    # Rows cut at every offset's first and last row read: each offset reads a run of whole segments.
    cuts = sorted({bound for read in reads_y for bound in (read.first, read.last)})
    segments = [s for s in zip(cuts, cuts[1:], strict=False) if any(_inside(s, read) for read in reads_y)]
    skipped = sorted({c for read in reads_x for c in _skipped(read, widths[read.phase])})
    # Every block of the lower triangle, keyed by the products it is made of.
    by_shift: dict[tuple, list[Block]] = {}
    offsets = list(itertools.product(range(kh), range(kw)))
    for k1, (j1y, j1x) in enumerate(offsets):
        for k2, (j2y, j2x) in enumerate(offsets[: k1 + 1]):
            one, two = (reads_y[j1y], reads_x[j1x]), (reads_y[j2y], reads_x[j2x])
            ey, ex = one[0].shift - two[0].shift, one[1].shift - two[1].shift
            phases = (one[0].phase, one[1].phase), (two[0].phase, two[1].phase)
            base_is_j1 = (ey, ex) < (0, 0) or ((ey, ex) == (0, 0) and phases[0] < phases[1])
            base, shifted = (one, two) if base_is_j1 else (two, one)
            if base_is_j1:
                ey, ex = -ey, -ex
            key = ((base[0].phase, base[1].phase), (shifted[0].phase, shifted[1].phase), ey, ex)
            by_shift.setdefault(key, []).append(Block(k1, k2, base[0], base[1], base_is_j1))
    shifts = []
    for (base, shifted, ey, ex), blocks in by_shift.items():
        used = [s for s in segments if any(_inside(s, block.read_y) for block in blocks)]
        columns = sorted({c for block in blocks for c in _skipped(block.read_x, widths[base[1]])})
        if used:
            shifts.append(Shift(base, shifted, ey, ex, blocks, used, columns))
    return Plan(
        reads_y, reads_x, (sh, sw), phase_rows + pad_rows, phase_columns + pad_columns, pad_columns,
        segments, skipped, shifts, out_h * out_w,
    )  # fmt: skip


def shifted_flops(todo: Plan, batch: int, channels: int) -> int:
    """FLOPs of add_shifted's products for one batch: each shift's row segments and skipped columns."""
    rows = sum((hi - lo) * batch * (todo.run + len(s.columns)) for s in todo.shifts for lo, hi in s.segments)
    return 2 * rows * channels**2


@dataclass(frozen=True)
class ShiftedInput:
    """A convolution's input laid out for shifted products (see the module's docstring), and its plan."""

    phases: dict[tuple[int, int], torch.Tensor]  # per phase, [margin + rows * B * run + margin, C], zero outside
    batch: int
    margin: int
    plan: Plan


def _worth_shifting(layer: Layer, x: torch.Tensor) -> Plan | None:
    """The plan where shifted products beat the patches' symmetric update for this layer and input (a convolution
    on the CPU, wide enough for fast products (MIN_CHANNELS), in fewer FLOPs), else None. (On a 2-core AVX2 EPYC,
    ResNet-9's 3x3 layers ran 1.2 to 3 times faster so, and its 5x5 stride-2 layer 1.2 to 1.5 times, the
    layout's copy included.)"""
    module = layer.module
    if not isinstance(module, nn.Conv2d) or x.device.type != "cpu" or x.dim() != 4:
        return None
    if module.in_channels < MIN_CHANNELS or module.weight[0, 0].numel() == 1:
        return None
    batch, channels, height, width = x.shape
    todo = plan(module, height, width)
    if todo.positions < 1 or not todo.shifts:  # no shifts: no offset reads the input (all patches are padding)
        return None
    patches = flops.symmetric_update(batch * todo.positions, layer.in_dim)
    return todo if shifted_flops(todo, batch, channels) < patches else None


def shifted_input(layer: Layer, x: torch.Tensor, todo: Plan | None = None) -> ShiftedInput:
    """x ([B, C, H, W]) laid out for add_shifted: about one copy of the input (each phase padded to the longest one
    and its pad rows and columns), against kh * kw / s^2 for its patches.
    `todo`: the plan for this input size, if made already."""
    batch, channels, height, width = x.shape
    todo = todo or plan(layer.module, height, width)
    (sh, sw), margin = todo.stride, todo.pad_columns
    body = todo.rows * batch * todo.run
    phases = {}
    for py, px in sorted({s.base for s in todo.shifts} | {s.shifted for s in todo.shifts}):
        flat = x.new_zeros(margin + body + margin, channels)
        grid = flat[margin : margin + body].view(todo.rows, batch, todo.run, channels)
        phase = x[:, :, py::sh, px::sw]
        grid[: phase.shape[2], :, : phase.shape[3]].copy_(phase.permute(2, 0, 3, 1))
        phases[py, px] = flat
    return ShiftedInput(phases, batch, margin, todo)


def covariance_input(layer: Layer, x: torch.Tensor) -> torch.Tensor | ShiftedInput:
    """What the covariance pass takes of a layer's input: the layout for shifted products where they are faster,
    else the patches a."""
    todo = _worth_shifting(layer, x)
    return input_patches(layer, x) if todo is None else shifted_input(layer, x, todo)


def _over_reads(
    by_segment: dict, by_column: dict, segments: list, columns: list, read_y: Read, read_x: Read
) -> torch.Tensor:
    """The sum of a per-segment quantity over the positions one kernel offset reads: its row segments, less the
    columns among `columns` it skips."""
    mine = [s for s in segments if _inside(s, read_y)]
    total = sum(by_segment[s] for s in mine)
    for column in columns:
        if not _reads_column(read_x, column):
            total = total - sum(by_column[s, column] for s in mine)
    return total


def add_shifted(total: torch.Tensor, layer: Layer, image: ShiftedInput) -> None:
    """total += A^T A for the layer's patches of `image`, in the engine's column order ((kh, kw, C), then the bias
    column), filling the lower triangle and the diagonal blocks (symmetrise with factors.symmetrised)."""
    todo = image.plan
    channels = layer.module.in_channels  # not read from a phase: a plan whose offsets read only padding has none
    per_row = image.batch * todo.run  # rows of a phase's layout per row of the phase

    def rows_of(phase: tuple[int, int], segment: tuple[int, int], shift: int) -> torch.Tensor:
        start = image.margin + segment[0] * per_row + shift
        return image.phases[phase][start : start + (segment[1] - segment[0]) * per_row]

    def column_of(phase: tuple[int, int], segment: tuple[int, int], column: int, shift: int) -> torch.Tensor:
        # One column of every (row, example) run of the segment: a strided matrix, no copy.
        flat = image.phases[phase]
        offset = flat.storage_offset() + (image.margin + segment[0] * per_row + column + shift) * channels
        shape = ((segment[1] - segment[0]) * image.batch, channels)
        return flat.as_strided(shape, (todo.run * channels, 1), offset)

    for shift in todo.shifts:
        offset = shift.ey * per_row + shift.ex
        base, shifted = shift.base, shift.shifted
        segment_products = {s: rows_of(base, s, 0).T @ rows_of(shifted, s, offset) for s in shift.segments}
        column_products = {
            (s, c): column_of(base, s, c, 0).T @ column_of(shifted, s, c, offset)
            for s in shift.segments
            for c in shift.columns
        }
        for block in shift.blocks:
            # sum_u x_u x'_(u+e)^T over the positions u the base offset reads: block (k1, k2) when the base is j1,
            # its transpose when the base is j2.
            product = _over_reads(
                segment_products, column_products, shift.segments, shift.columns, block.read_y, block.read_x
            )
            if isinstance(product, int):  # the base offset reads no segment: an empty sum, the block is zero
                continue
            rows, columns = (
                slice(block.k1 * channels, (block.k1 + 1) * channels),
                slice(block.k2 * channels, (block.k2 + 1) * channels),
            )
            total[rows, columns] += product if block.base_is_j1 else product.T
    flops.add(shifted_flops(todo, image.batch, channels), total.dtype, total.device)
    if layer.has_bias:
        # The bias column's row: sum_t a_t per offset (its phase summed over the positions it reads), then the
        # count of rows (the bias column's own entry).
        segment_sums = {p: {s: rows_of(p, s, 0).sum(dim=0) for s in todo.segments} for p in image.phases}
        column_sums = {
            p: {(s, c): column_of(p, s, c, 0).sum(dim=0) for s in todo.segments for c in todo.skipped}
            for p in image.phases
        }
        for k, (read_y, read_x) in enumerate(itertools.product(todo.reads_y, todo.reads_x)):
            phase = (read_y.phase, read_x.phase)
            if phase not in image.phases:  # a phase no block reads: this offset reads only padding
                continue
            read = _over_reads(segment_sums[phase], column_sums[phase], todo.segments, todo.skipped, read_y, read_x)
            total[-1, k * channels : (k + 1) * channels] += read
        total[-1, -1] += image.batch * todo.positions
