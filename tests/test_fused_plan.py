"""The fused path's launch planner fills an H100 at every norm shape of the model zoo (no GPU, no triton).

Every launch (stats, state, affine; grad_stats and grad_state run on the same grids) must have at least
min(528, ceil(E / 32768)) programs, E the elements of the largest tensor it reads: ResNet-50 at 224 px,
Mask R-CNN R50-FPN at 800x1344 (backbone, FPN, 7x7 and 14x14 RoI heads), the CIFAR ResNets at 32 px; device
batch 1-256; normalization batch n in 1..32; NCHW and NHWC; centered (bn, brn) and second moment (mabn).
The plan does not depend on the dtype (statistics are float32 whatever the input). That real launches use
these grids is checked in the interpreter suite (tests/fused_cases.py::test_launch_grids_are_the_plans).
"""

import pytest

from mabn.norms import _plan

from .fused_shapes import DEVICE_BATCHES, NORM_BATCHES, cifar_resnet_shapes, r50_fpn_shapes, resnet50_shapes

SHAPES = {"resnet50": resnet50_shapes(), "r50_fpn": r50_fpn_shapes(), "cifar_resnet": cifar_resnet_shapes()}


@pytest.mark.parametrize("model", SHAPES)
def test_every_launch_meets_the_program_target(model):
    failures, checked = [], 0
    for c, h, w in SHAPES[model]:
        for b in DEVICE_BATCHES:
            for n in (n for n in NORM_BATCHES if n <= b and b % n == 0):
                for channels_last in (False, True):
                    for centered, window in ((True, 0), (False, max(1, 32 // n))):
                        p = _plan.plan(b, c, h * w, b // n, channels_last=channels_last, centered=centered,
                                       window=window)
                        checked += 1
                        have, need = p.programs(), p.targets()
                        if any(have[k] < need[k] for k in need):
                            failures.append((c, h, w, b, n, channels_last, centered, have, need))
                        assert p.chunks >= 1 and p.chunk_rows * p.chunks >= p.rows
                        assert p.chunks == 1 or p.chunk_rows >= p.block_m  # a chunk is worth a program
    assert checked > 400 and not failures, failures[:5]


def test_the_largest_layers_split_and_small_ones_do_not():
    """The stem at device batch 32 (25.7 M elements): 2 programs before the split at n = 32, NHWC; now the
    reduction runs on >= 528. A CIFAR layer of 32 K elements stays one chunk: nothing to split."""
    stem = _plan.plan(32, 64, 112 * 112, 1, channels_last=True, centered=True)
    assert stem.stats_grid[1] == 2 and stem.programs()["stats"] >= 528 and stem.chunks >= 264
    small = _plan.plan(2, 16, 32 * 32, 1, channels_last=True, centered=True)
    assert small.chunks == 1 and small.programs()["stats"] == 1


def test_chunks_cover_the_rows_exactly():
    """Forced chunk counts (the interpreter suite's split cases): rows split evenly up to the last chunks,
    which may be short or empty; every row is in exactly one chunk."""
    for rows, k in ((18, 4), (18, 18), (18, 25), (9, 1)):
        p = _plan.plan(rows // 9 * 2, 5, 9, 2, channels_last=False, centered=True, chunks=k)
        sizes = [max(0, min(p.chunk_rows, p.rows - i * p.chunk_rows)) for i in range(p.chunks)]
        assert sum(sizes) == p.rows and p.chunks == k
