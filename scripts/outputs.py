"""Naming and eyeballing what evaluation and inference write.

MONAI's ``SaveImaged`` and ``MetricsSaver`` name outputs after the input file, and MONAI has no overlay writer
for a whole case (``monai.visualize`` makes TensorBoard images and matplotlib figures, and matplotlib is not a
dependency here).
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw
from scripts.isles import case_name
from scripts.reports import read_csv

__all__ = ["batch_cases", "case_formatter", "write_overlays"]

PANEL = 256  # pixels on the longer side of one slice
OUTLINE = (255, 0, 0)


def case_formatter(meta, saver):
    """``output_name_formatter`` for ``SaveImaged``: name the output after its case (``case_name`` of the first input
    file: the ISLES case folder, else the file name) instead of after the file, e.g. ``SMIR.Brain.XX.O.CT.345563``."""
    # FolderLayout strips what looks like a file extension from the subject: give it one to strip.
    return {"subject": f"{case_name(meta['filename_or_obj'])}.nii.gz"}


def batch_cases(batch):
    """``batch_transform`` for ``MetricsSaver``: each case's name, as ``case_formatter`` names its mask, for the
    ``filename`` column."""
    return [{"filename_or_obj": case_name(item["image"].meta["filename_or_obj"])} for item in batch]


def write_overlays(items, mask_dir, overlay_dir, ct_window=(0, 100), max_slices=4, report_csv=None):
    """For each datalist item (``image``: 5 map files or one 4D file) write ``overlay_dir/<case>.png`` (``case_name``):
    axial slices of the CT (top row, window ``ct_window`` HU) and CBF (bottom row), read from the input files, with the
    outline (red) of the lesion mask read back from ``mask_dir/<case>.nii.gz``. Slices: those with the largest lesion
    area, else spread over the slab. Shown in RAS orientation (anterior up, patient's right on the right). Raises
    ``ValueError`` naming both files when a mask does not lie on its scan's grid. With ``report_csv`` (volumes.csv)
    a second title line gives the case's predicted volume and perfusion figures."""
    os.makedirs(overlay_dir, exist_ok=True)
    report = {row["case"]: row for row in read_csv(report_csv)} if report_csv else {}
    for item in items:
        case = case_name(item["image"])
        mask_path = os.path.join(mask_dir, f"{case}.nii.gz")
        ct, cbf, affine, source = _ct_and_cbf(item["image"])
        mask_img = nib.load(mask_path)
        mask = np.asanyarray(mask_img.dataobj) > 0
        if mask.shape != ct.shape or not np.allclose(mask_img.affine, affine, atol=1e-3):
            raise ValueError(
                f"{case}: mask {mask_path} (shape {mask.shape}) does not lie on the grid of {source}"
                f" (shape {ct.shape})\n{mask_img.affine}\nvs\n{affine}"
            )
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
        if case in report:
            title += "\n" + _report_line(report[case])
        # zlib level 1: a third of the default level's time for an overlay of the same size (18 vs 62 ms)
        _grid(rows, size, title).save(os.path.join(overlay_dir, f"{case}.png"), compress_level=1)


def _report_line(row):
    """The predicted volume and the perfusion figures of a volumes.csv row, in one line (research use)."""
    if row.get("perfusion_note"):
        return f"predicted {row.get('volume_pred_ml', '?')} mL; no perfusion figures: {row['perfusion_note']}"
    return (
        f"predicted {float(row['volume_pred_ml']):.1f} mL | Tmax>6s {float(row['hypoperfusion_ml']):.1f} mL |"
        f" rCBF<30% {float(row['core_rcbf_ml']):.1f} mL | mismatch {float(row['mismatch_ml']):.1f} mL"
        f" (ratio {row['mismatch_ratio'] or '-'}) | HIR {row['hypoperfusion_intensity_ratio'] or '-'} (research use)"
    )


def _ct_and_cbf(image):
    """CT and CBF arrays, the affine and the CT's file of a case given as 5 files or one 4D file (channels last)."""
    if isinstance(image, str):
        img = nib.load(image)
        return np.asanyarray(img.dataobj[..., 0]), np.asanyarray(img.dataobj[..., 1]), img.affine, image
    ct = nib.load(image[0])
    return np.asanyarray(ct.dataobj), np.asanyarray(nib.load(image[1]).dataobj), ct.affine, image[0]


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
