"""How much a reduced-precision artifact disagrees with the FP32 MXNet reference.

No labels are needed: the FP32 model's own predictions on the evaluation
images are the ground truth, so a drop here is exactly what reducing
precision cost. Classification: top-1 agreement and whether the reference's
class is in the top 5; segmentation: pixel agreement and mIoU against the
reference's masks. Every family also gets relative and max error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# The family's headline metric, whose drop the budget limits.
HEADLINE = {"classification": "top1_agreement", "segmentation": "pixel_agreement"}


@dataclass(frozen=True)
class AccuracyReport:
    artifact: str
    family: str
    images: int
    rel_error: float
    max_abs_error: float
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    pixel_agreement: float | None = None
    miou: float | None = None

    @property
    def headline(self) -> str | None:
        return HEADLINE.get(self.family)

    @property
    def drop_pp(self) -> float | None:
        """Percentage points lost on the headline metric (0 when it agrees everywhere)."""
        if self.headline is None:
            return None
        return 100.0 * (1.0 - getattr(self, self.headline))

    def within(self, max_drop_pp: float) -> bool | None:
        drop = self.drop_pp
        return None if drop is None else drop <= max_drop_pp + 1e-9

    def to_dict(self) -> dict:
        return {**asdict(self), "headline": self.headline, "drop_pp": self.drop_pp}


def measure(artifact: str, family: str, actual: list[np.ndarray], reference: list[np.ndarray],
            images: int) -> AccuracyReport:
    """Compare per-output arrays stacked over the evaluation images (first axis = image)."""
    actual, reference = [a[:images] for a in actual], [r[:images] for r in reference]
    peak = max(float(np.max(np.abs(r))) for r in reference)
    max_abs = max(float(np.max(np.abs(a.astype(np.float64) - r.astype(np.float64))))
                  for a, r in zip(actual, reference))
    fields = {"rel_error": max_abs / peak if peak else float("inf") if max_abs else 0.0,
              "max_abs_error": max_abs}
    # The first output carries the classes (logits, or per-pixel scores).
    ref, act = reference[0], actual[0]
    if family == "classification" and ref.ndim == 2:
        ref_top = ref.argmax(axis=1)
        fields["top1_agreement"] = float(np.mean(act.argmax(axis=1) == ref_top))
        top5 = np.argsort(-act, axis=1)[:, :5]
        fields["top5_agreement"] = float(np.mean(np.any(top5 == ref_top[:, None], axis=1)))
    elif family == "segmentation" and ref.ndim == 4:
        ref_mask, act_mask = ref.argmax(axis=1), act.argmax(axis=1)
        fields["pixel_agreement"] = float(np.mean(ref_mask == act_mask))
        fields["miou"] = mean_iou(act_mask, ref_mask, ref.shape[1])
    return AccuracyReport(artifact=artifact, family=family, images=images, **fields)


def mean_iou(predicted: np.ndarray, reference: np.ndarray, classes: int) -> float:
    """Mean over the classes present in either mask of |P and R| / |P or R|."""
    ious = []
    for c in range(classes):
        p, r = predicted == c, reference == c
        union = np.count_nonzero(p | r)
        if union:
            ious.append(np.count_nonzero(p & r) / union)
    return float(np.mean(ious)) if ious else 1.0


def format_table(reports: list[AccuracyReport], max_drop_pp: float) -> str:
    """The table the CLI prints and the failure message shows."""
    header = (f"  {'artifact':<14} {'images':>6} {'top-1':>7} {'top-5':>7} {'pixel':>7} {'mIoU':>7} "
              f"{'rel err':>9} {'max err':>9} {'drop pp':>8}  budget {max_drop_pp:g} pp")
    rows = [header]

    def pct(value):
        return f"{100 * value:6.2f}%" if value is not None else f"{'-':>7}"

    for r in reports:
        verdict = {True: "ok", False: "MISSED", None: "no metric"}[r.within(max_drop_pp)]
        drop = f"{r.drop_pp:8.2f}" if r.drop_pp is not None else f"{'-':>8}"
        rows.append(f"  {r.artifact:<14} {r.images:>6} {pct(r.top1_agreement)} {pct(r.top5_agreement)} "
                    f"{pct(r.pixel_agreement)} {pct(r.miou)} {r.rel_error:9.2e} {r.max_abs_error:9.2e} "
                    f"{drop}  {verdict}")
    return "\n".join(rows)
