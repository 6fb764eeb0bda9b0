"""Eyeballing what evaluation and inference write: MONAI has no overlay image of a whole case (``monai.visualize``
makes TensorBoard images and matplotlib figures, and matplotlib is not a dependency here)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

__all__ = ["overlay_image", "report_line"]

PANEL = 256  # pixels on the longer side of one slice
OUTLINE = (255, 0, 0)


def overlay_image(case, ct, cbf, mask, affine, ct_window=(0, 100), report=None, max_slices=4) -> Image.Image:
    """The overlay of one case: axial slices of the CT (top row, window ``ct_window`` HU) and CBF (bottom row) with
    the outline (red) of the lesion mask; slices with the largest lesion area, else spread over the slab; in RAS
    orientation (anterior up, patient's right on the right).

    Args:
        case: the case's name, in the title.
        ct: the CT map as read, on the scan's grid.
        cbf: the CBF map as read, on the same grid.
        mask: the lesion mask on the same grid.
        affine: the grid's affine.
        ct_window: the CT display window in HU.
        report: a second title line (``report_line``), or None.
        max_slices: at most this many slices.

    Raises:
        ValueError: the three arrays do not share one shape.
    """
    if not ct.shape == cbf.shape == mask.shape:
        raise ValueError(f"{case}: CT {ct.shape}, CBF {cbf.shape} and mask {mask.shape} are not on one grid")
    ornt = nib.orientations.io_orientation(affine)
    ct, cbf, mask = (nib.orientations.apply_orientation(a, ornt) for a in (ct, cbf, mask))
    spacing = nib.affines.voxel_sizes(affine)[ornt[:, 0].astype(int)]
    slices = _pick_slices(mask, max_slices)
    positive = cbf[cbf > 0]
    cbf_range = np.percentile(positive, (1, 99)) if positive.size else (0, 1)
    size = _panel_size(ct.shape[:2], spacing[:2])
    rows = [
        [_panel(a[:, :, k], lo, hi, mask[:, :, k], size) for k in slices]
        for a, (lo, hi) in ((ct, ct_window), (cbf, cbf_range))
    ]
    title = f"{case}: axial slices {', '.join(str(k) for k in slices)} of {ct.shape[2]} (RAS); CT top, CBF bottom"
    return _grid(rows, size, title if report is None else f"{title}\n{report}")


def report_line(row):
    """The predicted volume and the perfusion figures of a per_case.csv row, in one line (research use)."""
    if row["hypoperfusion_ml"] == "":
        return f"predicted {row['volume_pred_ml']:.1f} mL; no perfusion figures: {row['perfusion_note']}"
    line = (
        f"predicted {row['volume_pred_ml']:.1f} mL | Tmax>6s {row['hypoperfusion_ml']:.1f} mL |"
        f" rCBF<30% {row['core_rcbf_ml']:.1f} mL | mismatch {row['mismatch_ml']:.1f} mL"
        f" (ratio {row['mismatch_ratio'] or '-'}) | HIR {row['hypoperfusion_intensity_ratio'] or '-'} (research use)"
    )
    return f"{line}\nnote: {row['perfusion_note']}" if row["perfusion_note"] else line


def _pick_slices(mask, count):
    area = mask.sum(axis=(0, 1))
    if area.any():
        return sorted(np.argsort(-area, kind="stable")[: min(count, int((area > 0).sum()))].tolist())
    return sorted(set(np.linspace(0, mask.shape[2] - 1, min(count, mask.shape[2])).round().astype(int).tolist()))


def _panel_size(shape, spacing):
    extent = np.asarray(shape) * np.asarray(spacing)
    width, height = np.maximum(1, np.round(PANEL * extent / extent.max())).astype(int)
    return int(width), int(height)


def _panel(values, lo, hi, mask, size):
    """RGB panel of one slice (x to the right, y up) with the mask outline drawn at display resolution."""
    grey = np.clip((values.astype(np.float64) - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.array(Image.fromarray(np.flipud(grey.T).astype(np.uint8)).resize(size, Image.BILINEAR).convert("RGB"))
    shown = np.asarray(Image.fromarray(np.flipud(mask.T).astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    padded = np.pad(shown, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    rgb[shown & ~inner] = OUTLINE
    return Image.fromarray(rgb)


def _grid(rows, size, title, gap=4, line_height=16):
    width, height = size
    lines = title.split("\n")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(line)) for line in lines) + 2 * gap
    header = line_height * len(lines)
    canvas = Image.new(
        "RGB", (max(len(rows[0]) * (width + gap) + gap, text_width), header + len(rows) * (height + gap))
    )
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((gap, 2 + index * line_height), line, fill=(255, 255, 255))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            canvas.paste(panel, (gap + c * (width + gap), header + r * (height + gap)))
    return canvas
