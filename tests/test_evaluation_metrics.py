"""The metrics of evaluation (scripts.report.metrics.score_case) on hand-made masks with known answers, the case report
of inference.json + evaluate.json over them on a bare engine, and the flip test-time inferer."""

import csv
import math
import os

import numpy as np
import pytest
import torch
from helpers import challenge_scoring
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from panoptica import Panoptica_Evaluator
from scripts.engine.inferers import FlipInferer
from scripts.report.cases import PER_CASE, SUMMARY, THRESHOLD_CORE, CaseOutputsWriter
from scripts.report.metrics import METRIC_NAMES, score_case
from scripts.report.perfusion import perfusion_figures

SPACING = (0.5, 0.5, 5.0)  # mm: anisotropic, as ISLES slabs are
VOXEL_ML = 0.5 * 0.5 * 5.0 / 1000
NAN = math.nan
COLUMNS = list(METRIC_NAMES)


def box(z0, z1):
    """A 4 x 4 in-plane box over slices z0..z1-1 of an 8 x 8 x 4 grid, channel first."""
    mask = torch.zeros(1, 8, 8, 4)
    mask[:, 2:6, 2:6, z0:z1] = 1
    return mask


EMPTY = torch.zeros(1, 8, 8, 4)
# case: (prediction, label, expected values in COLUMNS order), worked out by hand in the comments; one lesion per
# mask, matched (lesion_f1 1, lesion_count_diff 0) where the IoU (1/3 shifted, 1/2 larger) is at least 0.2
CASES = {
    # one slice of overlap out of two; every voxel of a 2-slice box is on its surface: 16 distances of 0 and 16 of
    # one slice (5 mm) each way -> HD95 5 mm, ASSD 2.5 mm (1 and 0.5 if the spacing were ignored)
    "shifted": (box(1, 3), box(0, 2), [0.5, 1 / 3, 0.5, 0.5, 5.0, 2.5, 32 * VOXEL_ML, 32 * VOXEL_ML, 0.0, 1.0, 0.0]),
    # prediction = label (z 0-1) plus z 2-3: 56 of its 64 voxels are on its surface, 28 of them in the label (0 mm),
    # 12 at 5 mm, 16 at 10 mm; 28 label voxels are on the prediction's surface, 4 are 0.5 mm (one voxel in-plane)
    # from it -> HD95 max(10, 0.5) = 10 mm, ASSD (12 * 5 + 16 * 10 + 4 * 0.5) / (56 + 32) mm
    "larger": (
        box(0, 4),
        box(0, 2),
        [2 / 3, 0.5, 0.5, 1.0, 10.0, 222 / 88, 32 * VOXEL_ML, 64 * VOXEL_ML, 32 * VOXEL_ML, 1.0, 0.0],
    ),
    "both_empty": (EMPTY, EMPTY, [1.0, 1.0, NAN, NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
    "missed": (EMPTY, box(0, 2), [0.0, 0.0, NAN, 0.0, NAN, NAN, 32 * VOXEL_ML, 0.0, 32 * VOXEL_ML, 0.0, 1.0]),
    "false_alarm": (box(0, 2), EMPTY, [0.0, 0.0, 0.0, NAN, NAN, NAN, 0.0, 32 * VOXEL_ML, 32 * VOXEL_ML, 0.0, 1.0]),
}


def on_grid(mask):
    """The mask as the evaluator hands it over after Invertd: a MetaTensor on the scan's grid (here L-R flipped)."""
    return MetaTensor(mask, affine=torch.diag(torch.tensor([-SPACING[0], SPACING[1], SPACING[2], 1.0])))


def same(value, expected):
    value = float(value)
    return math.isnan(expected) and math.isnan(value) or math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-6)


def test_every_metric_on_hand_made_masks():
    for case, (pred, label, expected) in CASES.items():
        values = score_case(pred, label, SPACING)
        assert list(values) == COLUMNS
        for name, want in zip(COLUMNS, expected):
            assert same(values[name], want), (case, name, values[name], want)


@pytest.fixture
def reported(repo_root, tmp_path):
    """The case report of inference.json + evaluate.json (its CaseOutputsWriter, as the configs build it) run over
    CASES on a bare engine: the model's masks as ``pred`` and the same masks again as the threshold core's."""
    parser = ConfigParser()
    parser.read_config([os.path.join(repo_root, "configs", name) for name in ("inference.json", "evaluate.json")])
    parser["output_dir"] = str(tmp_path)
    (writer,) = [h for h in parser.get_parsed_content("handlers") if isinstance(h, CaseOutputsWriter)]
    assert writer.reference_key == "label" and writer.baseline_keys == [THRESHOLD_CORE]
    engine = Engine(lambda engine, batch: batch)
    writer.attach(engine)
    maps = {key: MetaTensor(torch.rand(1, 8, 8, 4) * 50) for key in parser.get_parsed_content("input_map_keys")}
    batches = []
    for case, (pred, label, _) in CASES.items():
        mask = on_grid(pred)
        mask.meta["filename_or_obj"] = f"/data/{case}.nii.gz"
        figures = perfusion_figures(None, "no maps here", VOXEL_ML)
        case_data = {"case": case, "pred": mask, THRESHOLD_CORE: on_grid(pred), "label": label, "perfusion": figures}
        batches.append([{**maps, **case_data}])
    engine.run(batches)
    return os.path.join(str(tmp_path), "eval")


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_report_scores_the_model_and_each_baseline_by_the_same_metrics(reported):
    rows = read(os.path.join(reported, PER_CASE))
    assert [row["case"] for row in rows] == list(CASES)
    for row, (case, (_, _, expected)) in zip(rows, CASES.items()):
        for name, want in zip(COLUMNS, expected):
            assert same(row[name], want) and same(row[f"{THRESHOLD_CORE}_{name}"], want), (case, name)
    assert sorted(os.listdir(os.path.join(reported, "masks"))) == sorted(f"{case}.nii.gz" for case in CASES)


def test_the_summary_leaves_nans_out(capsys, reported):
    summary = read(os.path.join(reported, SUMMARY))
    assert [(r["mask"], r["metric"]) for r in summary] == [
        (m, n) for m in ("ModifiedUNet", THRESHOLD_CORE) for n in COLUMNS
    ]
    for entry in summary:
        column = COLUMNS.index(entry["metric"])
        defined = [expected[column] for _, _, expected in CASES.values() if not math.isnan(expected[column])]
        assert int(entry["notnans"]) == len(defined), entry
        assert math.isclose(float(entry["mean"]), np.mean(defined), abs_tol=1e-6), entry
        assert math.isclose(float(entry["90percentile"]), np.percentile(defined, 90), abs_tol=1e-6), entry
        assert {"std", "median", "min", "max"} <= set(entry)
    hd95 = next(r for r in summary if r["metric"] == "hd95_mm")
    assert float(hd95["mean"]) == pytest.approx((5.0 + 10.0 + 0.0) / 3), "undefined values are left out, not zero"
    printed = capsys.readouterr().out
    assert f"{SUMMARY}: 5 cases" in printed and "hd95_mm" in printed and "median" in printed


def test_flip_inferer_averages_probabilities_of_the_mirror_images():
    """A network that is not mirror-symmetric (it adds a ramp along x): every pass that flips x sees the ramp
    reversed, so the mean probability is half softmax(x + ramp), half softmax(x + reversed ramp)."""
    ramp = torch.linspace(-2, 2, 6).view(1, 1, 6, 1, 1) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1, 1)
    inputs = torch.randn(1, 2, 6, 5, 4, generator=torch.Generator().manual_seed(0))

    def net(x):
        return x + ramp

    expected = 0.5 * (torch.softmax(inputs + ramp, 1) + torch.softmax(inputs + ramp.flip(2), 1))
    out = FlipInferer()(inputs, net)
    assert out.shape == inputs.shape
    assert torch.allclose(torch.softmax(out, 1), expected, atol=1e-6)
    assert len(FlipInferer().flips) == 8 and FlipInferer(spatial_axes=[]).flips == [[]]
    assert torch.allclose(torch.softmax(FlipInferer(spatial_axes=[])(inputs, net), 1), torch.softmax(net(inputs), 1))


def blobs(rng, shape, count):
    """``count`` random boxes (2-6 voxels a side) in a grid of ``shape``; some touch, so components merge."""
    mask = np.zeros(shape, bool)
    for _ in range(count):
        size = rng.integers(2, 7, size=3)
        corner = [rng.integers(0, n - s) for n, s in zip(shape, size)]
        mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


def test_the_challenge_figures_are_panopticas_on_several_lesions_and_empty_masks():
    """lesion_f1, lesion_count_diff, dice and volume_abs_diff_ml of score_case against the challenge's own scoring."""
    rng = np.random.default_rng(0)
    shape = (40, 40, 12)
    pairs = []
    for _ in range(12):
        label = blobs(rng, shape, int(rng.integers(1, 6)))
        kept = label & (rng.random(shape) < 0.95)  # prediction: the label thinned, some lesions dropped, new ones
        for dropped in blobs(rng, shape, 2):
            kept &= ~dropped
        pairs.append((kept | blobs(rng, shape, int(rng.integers(0, 3))), label))
    empty = np.zeros(shape, bool)
    pairs += [(empty, empty), (empty, pairs[0][1]), (pairs[0][0], empty), (pairs[1][1], pairs[1][1])]
    for pred, label in pairs:
        expected = challenge_scoring(pred, label, VOXEL_ML)
        values = score_case(pred, label, SPACING)
        ours = [values[name] for name in ("lesion_f1", "lesion_count_diff", "dice", "volume_abs_diff_ml")]
        assert all(same(value, float(want)) for value, want in zip(ours, expected)), (ours, expected)
    assert {round(float(challenge_scoring(p, l, 1)[0]), 3) for p, l in pairs[:12]} - {0.0, 1.0}, "partial matches"


def test_one_matching_per_pair_of_masks_for_both_lesion_figures(monkeypatch):
    """lesion_f1 and lesion_count_diff of one pair come from one panoptica matching; nothing is kept between pairs
    (the same pair again is matched again, a pair that differs by one voxel gets its own figures)."""
    label = blobs(np.random.default_rng(3), (30, 30, 8), 4)
    pred = np.roll(label, 1, axis=0)
    changed = pred.copy()
    changed.flat[np.flatnonzero(~changed)[0]] = True  # one more voxel: a new lesion
    expected = [tuple(float(v) for v in challenge_scoring(p, label, VOXEL_ML)[:2]) for p in (pred, changed)]
    calls = []
    evaluate = Panoptica_Evaluator.evaluate
    monkeypatch.setattr(
        Panoptica_Evaluator, "evaluate", lambda self, *a, **k: calls.append(1) or evaluate(self, *a, **k)
    )

    def both(p, l):
        values = score_case(p, l, SPACING)
        return values["lesion_f1"], values["lesion_count_diff"]

    assert both(pred, label) == pytest.approx(expected[0]) and len(calls) == 1
    assert both(changed, label) == pytest.approx(expected[1]) and len(calls) == 2
    assert both(pred, label) == pytest.approx(expected[0]) and len(calls) == 3
