"""The papers' reported numbers, for the labelled reference columns of results/ tables (never mixed with ours).

Classification numbers are ImageNet ResNet-50 top-1 *error* (%) per normalization batch n; detection numbers
are COCO Mask R-CNN R50-FPN box/mask AP at 2 images per GPU. ``approx`` marks values read off a figure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reported:
    """One paper's numbers for one setting: {norm: {n: value}}."""

    label: str          # column header: who reported it, on what
    metric: str         # what the value is
    values: dict        # {norm: {n: float}}
    approx: frozenset = frozenset()   # (norm, n) read off a figure (±0.05 or so)

    def get(self, norm: str, n: int) -> str:
        value = self.values.get(norm, {}).get(n)
        if value is None:
            return ""
        return f"{'≈' if (norm, n) in self.approx else ''}{value:g}"  # as printed in the paper


# Yan et al., ICLR 2020, official README: its table gives BN at n = 2 and 32, BRN and MABN at n = 2; every
# other value is read off its error-vs-n figure.
_MABN_IMAGENET_VALUES = {"bn": {2: 35.22, 4: 27.9, 8: 25.5, 16: 24.3, 32: 23.41},
                         "brn": {2: 30.29, 4: 26.9, 8: 25.3, 16: 24.4, 32: 23.5},
                         "mabn": {1: 23.7, 2: 23.67, 4: 23.7, 8: 23.6, 16: 23.7, 32: 23.5}}
_MABN_IMAGENET_TABLE = {("bn", 2), ("bn", 32), ("brn", 2), ("mabn", 2)}
MABN_IMAGENET = Reported(
    label="MABN paper: ImageNet R50 top-1 err", metric="top-1 error (%)", values=_MABN_IMAGENET_VALUES,
    approx=frozenset((norm, n) for norm, row in _MABN_IMAGENET_VALUES.items() for n in row) - _MABN_IMAGENET_TABLE)

# Wu & He, ECCV 2018, Figure/table of top-1 accuracy vs images per GPU; shown here as 100 - accuracy.
GN_IMAGENET = Reported(
    label="GN paper: ImageNet R50 top-1 err (100 − acc)",
    metric="top-1 error (%)",
    values={"bn": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
            "gn": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1}})

# Yan et al. 2020, COCO Mask R-CNN R50-FPN 2x (180k iterations), 8 GPUs x 2 images; "syncbn" over 16 images.
MABN_COCO_SCRATCH_BOX = Reported(
    label="MABN paper: COCO 2x scratch box AP", metric="box AP",
    values={"bn": {2: 32.38}, "brn": {2: 34.07}, "syncbn": {2: 36.80}, "mabn": {2: 36.50}})
MABN_COCO_SCRATCH_MASK = Reported(
    label="MABN paper: COCO 2x scratch mask AP", metric="mask AP",
    values={"bn": {2: 29.07}, "brn": {2: 30.98}, "syncbn": {2: 33.10}, "mabn": {2: 32.69}})
MABN_COCO_FINETUNE_BOX = Reported(
    label="MABN paper: COCO 2x fine-tune box AP", metric="box AP",
    values={"syncbn": {2: 38.25}, "mabn": {2: 38.42}})
MABN_COCO_FINETUNE_MASK = Reported(
    label="MABN paper: COCO 2x fine-tune mask AP", metric="mask AP",
    values={"syncbn": {2: 34.22}, "mabn": {2: 34.12}})


def reported_for(task: str, table: str) -> list[Reported]:
    """The reference columns for a table: ImageNet numbers beside classification tables (on other data they
    are a reference for the shape of the curve, not a target), COCO 2x numbers beside detection tables."""
    if task == "classification":
        return [MABN_IMAGENET, GN_IMAGENET]
    if "finetune" in table:
        return [MABN_COCO_FINETUNE_BOX, MABN_COCO_FINETUNE_MASK]
    return [MABN_COCO_SCRATCH_BOX, MABN_COCO_SCRATCH_MASK]


@dataclass(frozen=True)
class TreatmentsReported:
    """Wu & Johnson's numbers for the inference-statistics treatments: {column key: {n: value}}."""

    columns: tuple      # (key, header)
    values: dict        # {key: {n: float}}
    approx: frozenset   # keys read off a figure (±0.2)
    source: str

    @property
    def batches(self) -> list[int]:
        return sorted({n for row in self.values.values() for n in row}, reverse=True)

    def get(self, key: str, n: int) -> str:
        value = self.values.get(key, {}).get(n)
        if value is None:
            return ""
        return f"{'≈' if key in self.approx else ''}{value:g}"


# Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021): ImageNet ResNet-50, 100 epochs, SGD batch 256, top-1
# error (%) against the normalization batch (NBS). Table 2: EMA and PreciseBN over N = 10^4 samples at estimation
# batch B. Fig. 6 (read off, ±0.2): population statistics against NBS, BN frozen for the last 20 epochs, and
# mini-batch statistics at test.
WU_JOHNSON = TreatmentsReported(
    columns=(("ema", "EMA"), ("b2", "B = 2"), ("b10", "B = 10"), ("b100", "B = 100"), ("b1000", "B = 1000"),
             ("bN", "B = N"), ("population", "Fig. 6 population stats"), ("frozen", "frozen last 20 %"),
             ("batch", "batch stats at test")),
    values={"ema": {32: 23.7, 2: 35.5}, "b2": {32: 28.8, 2: 34.4}, "b10": {32: 24.0, 2: 32.3},
            "b100": {32: 23.5, 2: 32.0}, "b1000": {32: 23.5, 2: 32.0}, "bN": {32: 23.5, 2: 32.0},
            "population": {32: 23.4, 16: 23.5, 8: 24.3, 4: 26.4, 2: 32.5},
            "frozen": {32: 24.3, 2: 25.2}, "batch": {32: 24.5, 2: 26.0}},
    approx=frozenset({"population", "frozen", "batch"}),
    source="Wu & Johnson 2021, Table 2 (EMA, B = ...) and Fig. 6 (≈: read off the figure, ±0.2). Their NBS is "
           "this table's n; N = 10⁴ training images.")
