"""The fused path's grids and tiles: one pure function of the shapes (no tensor, no device), tested over the
model zoo's norm shapes (tests/test_fused_plan.py).

A fused layer's launches (``_fused``): forward (1) ``stats`` reads x once and writes per-(group, chunk,
channel) partial statistics, (2) ``state`` merges the chunks of each group in order and walks the groups,
(3) ``affine`` writes y; backward (1) ``grad_stats`` reads dy and x, (2) ``grad_state``, (3) ``affine``
writes dx. Every launch must fill the GPU: at least ``min(PROGRAM_TARGET, ceil(E / ELEMENTS_PER_PROGRAM))``
programs, E the elements of the largest tensor it reads (528 = 4 programs per H100 SM, so the largest layers
reach the memory bandwidth; a small layer needs few). The reductions get there by splitting each
(group, channel-block) reduction over K chunks of rows; the state kernels merge the chunks exactly and
deterministically (Chan's pairwise merge of count/mean/M2; plain sums), with no float atomics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PROGRAM_TARGET = 528  # 4 programs on each of an H100's 132 SMs
ELEMENTS_PER_PROGRAM = 32768  # a layer this small or smaller is one program's work
STATE_BLOCK_C = 32  # channels per program of the state kernels: one warp, one channel per thread


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def target(elements: int) -> int:
    """Programs a launch reading ``elements`` (its largest tensor) must have."""
    return min(PROGRAM_TARGET, cdiv(elements, ELEMENTS_PER_PROGRAM))


@dataclass(frozen=True)
class Plan:
    """Tiles and grids of one fused call on an (N, C, S) input split into ``groups`` normalization batches."""

    n_all: int
    channels: int
    spatial: int
    groups: int
    block_m: int  # rows (sample x position) per tile
    block_c: int  # channels per tile
    chunks: int  # K: row chunks per group of the split reductions
    chunk_rows: int  # rows per chunk (the last chunks of a group may hold fewer, or none)
    partials: int  # arrays of (G, K, C) partial statistics the state kernel reads (centered: 2, else 1)
    window: int = 0  # MABN's ring (window x C) the state kernels also read

    @property
    def rows(self) -> int:
        """Rows of one normalization batch: samples in the group x positions."""
        return self.n_all // self.groups * self.spatial

    @property
    def elements(self) -> int:
        return self.n_all * self.channels * self.spatial

    @property
    def stats_grid(self) -> tuple[int, int]:
        return self.groups * self.chunks, cdiv(self.channels, self.block_c)

    @property
    def state_grid(self) -> tuple[int]:
        return (cdiv(self.channels, STATE_BLOCK_C),)

    @property
    def affine_grid(self) -> tuple[int, int]:
        return cdiv(self.n_all * self.spatial, self.block_m), cdiv(self.channels, self.block_c)

    @property
    def state_elements(self) -> int:
        """Elements of the largest tensor a state kernel reads: the partials, or MABN's ring."""
        return max(self.groups * self.chunks * self.channels, self.window * self.channels)

    def programs(self) -> dict[str, int]:
        """Programs of each launch kind."""
        return {name: math.prod(grid) for name, grid in
                (("stats", self.stats_grid), ("state", self.state_grid), ("affine", self.affine_grid))}

    def targets(self) -> dict[str, int]:
        """What each launch kind must reach (grad_stats reads dy and x, of E each: the same as stats)."""
        return {"stats": target(self.elements), "state": target(self.state_elements),
                "affine": target(self.elements)}

    def meets_targets(self) -> bool:
        have, need = self.programs(), self.targets()
        return all(have[k] >= need[k] for k in need)


def tiles(channels_last: bool, channels: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): channel-wide tiles where channels are contiguous (NHWC), position-wide otherwise;
    a narrow NHWC layer takes 16 channels a tile, so its reductions split into enough programs."""
    if channels_last and channels > 1:
        return (32, 32) if channels > 32 else (64, 16)
    return 128, 4


def plan(n_all: int, channels: int, spatial: int, groups: int, *, channels_last: bool, centered: bool,
         window: int = 0, chunks: int | None = None) -> Plan:
    """The tiles and the chunk count K of a fused call. K is the smallest that gives the reductions their
    program target, capped so that each chunk holds at least one tile of rows (a chunk is worth a program);
    ``chunks`` overrides it (tests: uneven chunks, more chunks than rows)."""
    block_m, block_c = tiles(channels_last, channels)
    rows = n_all // groups * spatial
    channel_blocks = cdiv(channels, block_c)
    if chunks is None:
        want = cdiv(target(n_all * channels * spatial), groups * channel_blocks)
        chunks = max(1, min(want, cdiv(rows, block_m)))
    chunk_rows = max(1, cdiv(rows, chunks))
    return Plan(n_all, channels, spatial, groups, block_m, block_c, chunks, chunk_rows, 2 if centered else 1,
                window)
