"""A stride-1 convolution's activation covariance A^T A from shifted products of its input, without patches.

The patches a of a convolution hold, in the column block of kernel offset j, the input at t + j*dilation -
padding for each output position t. The block of A^T A for offsets (j1, j2) is therefore a sum of x_u x_(u+e)^T
over the input positions u that offset j2 reads, with e = (j1 - j2) * dilation: blocks that share a shift e
share their products, up to which positions they sum over. A 3x3 kernel has 13 shifts e >= 0 (in raster order)
for the 45 blocks of the lower triangle, so the products cost 2 * 13 * n * C^2 FLOPs for n input positions and
C channels, against 81 * n * C^2 for the symmetric update of the patches (9C columns), and the patches, nine
copies of the input, are never gathered.

Which positions each block sums over is handled in two steps. Rows: the input's rows are cut into segments at
every offset's first and last row read, so each offset reads whole segments. Columns: every offset reads all
columns but a few at the edges (one for a 3x3 kernel with padding 1), whose products are subtracted.

The input is laid out as [H + pad rows, B, W + pad columns, C], zero-filled, and flattened to rows of C values:
a shift e is then a constant offset in rows, so every product is a matrix product of two slices of one tensor
(the columns as a strided slice), with no copy. The zero rows and columns take the shifted positions that fall
outside the input, which the convolution's zero padding reads as zeros.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from influence import flops
from influence.modules import Layer, conv_padding, input_patches

MIN_CHANNELS = 16  # below this, the per-shift products are too small to run at the matrix-product rate


def _reads(size: int, kernel: int, dilation: int, before: int, out: int) -> list[tuple[int, int]]:
    """[first, last) input index each kernel offset reads along one axis, clipped to the input."""
    return [(max(0, j * dilation - before), min(size, j * dilation - before + out)) for j in range(kernel)]


def _inside(segment: tuple[int, int], read: tuple[int, int]) -> bool:
    return read[0] <= segment[0] and segment[1] <= read[1]


def _reads_column(read: tuple[int, int], column: int) -> bool:
    return read[0] <= column < read[1]


@dataclass(frozen=True)
class Shift:
    """One shift e = (ey, ex) in kernel offsets, e >= 0 in raster order, and the products it needs."""

    ey: int
    ex: int
    bases_y: range  # the offsets j whose j + e is an offset too: the blocks (j + e, j) it fills
    bases_x: range
    segments: list[tuple[int, int]]  # the row segments some base reads
    columns: list[int]  # the columns some base skips


@dataclass(frozen=True)
class Plan:
    """What add_shifted computes for one convolution and input size (see the module's docstring)."""

    reads_y: list[tuple[int, int]]  # per kernel offset, the input rows [first, last) it reads
    reads_x: list[tuple[int, int]]
    segments: list[tuple[int, int]]
    skipped: list[int]  # the columns some offset skips
    shifts: list[Shift]
    positions: int  # output positions per example


def plan(module: nn.Conv2d, height: int, width: int) -> Plan:
    top, bottom, left, right = conv_padding(module)
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    out_h, out_w = height + top + bottom - dh * (kh - 1), width + left + right - dw * (kw - 1)
    reads_y, reads_x = _reads(height, kh, dh, top, out_h), _reads(width, kw, dw, left, out_w)
    # Rows cut at every offset's first and last row read: each offset reads a run of whole segments.
    cuts = sorted({bound for read in reads_y for bound in read})
    segments = [s for s in zip(cuts, cuts[1:], strict=False) if any(_inside(s, read) for read in reads_y)]
    skipped = sorted({c for read in reads_x for c in range(width) if not _reads_column(read, c)})
    shifts = []
    for ey in range(kh):
        for ex in range(-kw + 1, kw):
            if ey == 0 and ex < 0:
                continue  # e < 0: its blocks are the transposes of -e's, in the upper triangle
            bases_y, bases_x = range(kh - ey), range(max(0, -ex), min(kw, kw - ex))
            used = [s for s in segments if any(_inside(s, reads_y[j]) for j in bases_y)]
            columns = [c for c in skipped if any(not _reads_column(reads_x[j], c) for j in bases_x)]
            shifts.append(Shift(ey, ex, bases_y, bases_x, used, columns))
    return Plan(reads_y, reads_x, segments, skipped, shifts, max(out_h, 0) * max(out_w, 0))


def shifted_flops(todo: Plan, batch: int, run: int, channels: int) -> int:
    """FLOPs of add_shifted's products for one batch: each shift's row segments and skipped columns."""
    rows = sum((hi - lo) * batch * (run + len(shift.columns)) for shift in todo.shifts for lo, hi in shift.segments)
    return 2 * rows * channels**2


@dataclass(frozen=True)
class ShiftedInput:
    """A convolution's input laid out for shifted products (see the module's docstring), and its plan."""

    flat: torch.Tensor  # [margin + (H + pad rows) * B * run + margin, C], zero outside the input
    batch: int
    run: int  # W + pad columns: rows of `flat` per (input row, example)
    margin: int
    plan: Plan


def _run(module: nn.Conv2d, width: int) -> int:
    """Rows of the layout per (input row, example): the row and the pad columns the widest shift reaches."""
    return width + (module.kernel_size[1] - 1) * module.dilation[1]


def _worth_shifting(layer: Layer, x: torch.Tensor) -> Plan | None:
    """The plan where shifted products beat the patches' symmetric update for this layer and input (a stride-1
    convolution on the CPU, wide enough for fast products (MIN_CHANNELS), in fewer FLOPs), else None. (On a 2-core
    AVX2 EPYC, ResNet-9's 3x3 layers ran 1.2 to 3 times faster so, the layout's copy included.)"""
    module = layer.module
    if not isinstance(module, nn.Conv2d) or x.device.type != "cpu" or x.dim() != 4:
        return None
    if tuple(module.stride) != (1, 1) or module.in_channels < MIN_CHANNELS or module.weight[0, 0].numel() == 1:
        return None
    batch, channels, height, width = x.shape
    todo = plan(module, height, width)
    if todo.positions < 1:
        return None
    patches = flops.symmetric_update(batch * todo.positions, layer.in_dim)
    return todo if shifted_flops(todo, batch, _run(module, width), channels) < patches else None


def shifted_input(layer: Layer, x: torch.Tensor, todo: Plan | None = None) -> ShiftedInput:
    """x ([B, C, H, W]) laid out for add_shifted: one copy of the input, against kh * kw for its patches.
    `todo`: the plan for this input size, if made already."""
    module = layer.module
    batch, channels, height, width = x.shape
    run = _run(module, width)
    pad_cols, pad_rows = run - width, (module.kernel_size[0] - 1) * module.dilation[0]
    body = (height + pad_rows) * batch * run
    flat = x.new_zeros(pad_cols + body + pad_cols, channels)
    grid = flat[pad_cols : pad_cols + body].view(height + pad_rows, batch, run, channels)
    grid[:height, :, :width].copy_(x.permute(2, 0, 3, 1))
    return ShiftedInput(flat, batch, run, pad_cols, todo or plan(module, height, width))


def covariance_input(layer: Layer, x: torch.Tensor) -> torch.Tensor | ShiftedInput:
    """What the covariance pass takes of a layer's input: the layout for shifted products where they are faster,
    else the patches a."""
    todo = _worth_shifting(layer, x)
    return input_patches(layer, x) if todo is None else shifted_input(layer, x, todo)


def _over_reads(
    by_segment: dict, by_column: dict, segments: list, columns: list, read_y: tuple[int, int], read_x: tuple[int, int]
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
    kw, (dh, dw) = layer.module.kernel_size[1], layer.module.dilation
    flat, channels, todo = image.flat, image.flat.shape[1], image.plan
    per_row = image.batch * image.run  # rows of `flat` per input row

    def rows_of(segment: tuple[int, int], shift: int) -> torch.Tensor:
        start = image.margin + segment[0] * per_row + shift
        return flat[start : start + (segment[1] - segment[0]) * per_row]

    def column_of(segment: tuple[int, int], column: int, shift: int) -> torch.Tensor:
        # One column of every (row, example) run of the segment: a strided matrix, no copy.
        offset = flat.storage_offset() + (image.margin + segment[0] * per_row + column + shift) * channels
        shape = ((segment[1] - segment[0]) * image.batch, channels)
        return flat.as_strided(shape, (image.run * channels, 1), offset)

    for shift in todo.shifts:
        offset = shift.ey * dh * per_row + shift.ex * dw
        segment_products = {s: rows_of(s, 0).T @ rows_of(s, offset) for s in shift.segments}
        column_products = {
            (s, c): column_of(s, c, 0).T @ column_of(s, c, offset) for s in shift.segments for c in shift.columns
        }
        for jy in shift.bases_y:
            for jx in shift.bases_x:
                read_y, read_x = todo.reads_y[jy], todo.reads_x[jx]
                block = _over_reads(segment_products, column_products, shift.segments, shift.columns, read_y, read_x)
                # The block of offsets (j + e, j) is (sum_u x_u x_(u+e)^T)^T, u over the positions j reads.
                k1, k2 = (jy + shift.ey) * kw + jx + shift.ex, jy * kw + jx
                total[k1 * channels : (k1 + 1) * channels, k2 * channels : (k2 + 1) * channels] += block.T
    flops.add(shifted_flops(todo, image.batch, image.run, channels), total.dtype, total.device)
    if layer.has_bias:
        # The bias column's row: sum_t a_t per offset (the input summed over the positions it reads), then the
        # count of rows (the bias column's own entry).
        segment_sums = {s: rows_of(s, 0).sum(dim=0) for s in todo.segments}
        column_sums = {(s, c): column_of(s, c, 0).sum(dim=0) for s in todo.segments for c in todo.skipped}
        for k, (read_y, read_x) in enumerate(itertools.product(todo.reads_y, todo.reads_x)):
            read = _over_reads(segment_sums, column_sums, todo.segments, todo.skipped, read_y, read_x)
            total[-1, k * channels : (k + 1) * channels] += read
        total[-1, -1] += image.batch * todo.positions
