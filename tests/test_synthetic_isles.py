"""The synthetic ISLES 2018 generator, checked on the files it writes to temp dirs."""

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.data.channels import CHANNELS
from scripts.data.isles18 import LABEL, SMIR_NAME, TESTING_DIR, TRAINING_DIR, key_of_token
from scripts.synthetic.isles import generate

REPO_ROOT = Path(__file__).resolve().parents[1]
SLICES = (2, 4, 8)
IN_PLANE = 48
DTYPES = {"CT": np.int32, "CBF": np.uint16, "CBV": np.uint16, "MTT": np.float64, "Tmax": np.float64, LABEL: np.uint8}
TOKENS = {"CT": "CT", "CBF": "CT_CBF", "CBV": "CT_CBV", "MTT": "CT_MTT", "Tmax": "CT_Tmax", LABEL: "OT"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """8 training cases (some patients with two slabs) and 2 testing cases, with their summary."""
    root = tmp_path_factory.mktemp("synthetic")
    summary = generate(root, num_train=8, num_test=2, seed=3, in_plane=IN_PLANE, slices=SLICES, two_slab_fraction=0.5)
    return root, summary


def case_dirs(root, split):
    """case_1, case_2, ... of one split, in numeric order."""
    return sorted((root / split).iterdir(), key=lambda d: int(d.name.split("_")[1]))


def load_case(case_dir):
    """{key: nibabel image} of a case folder, keyed by channel name or OT."""
    return {key_of_token(SMIR_NAME.match(d.name)["mod"]): nib.load(next(d.iterdir())) for d in case_dir.iterdir()}


def arrays(images):
    return {key: np.asanyarray(image.dataobj) for key, image in images.items()}


def training_cases(root):
    return [arrays(load_case(d)) for d in case_dirs(root, TRAINING_DIR)]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def tree_bytes(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def best_dice(values, label):
    """Best Dice of `values <= t` or `values >= t` with `label`, over every threshold t."""
    best = 0.0
    for v in (values, -values):
        order = np.argsort(v, kind="stable")
        v_sorted, hits = v[order], np.cumsum(label[order])
        cuts = np.append(np.flatnonzero(np.diff(v_sorted)), len(v) - 1)  # last index of each run of equal values
        best = max(best, float(np.max(2 * hits[cuts] / (cuts + 1 + label.sum()))))
    return best


def test_layout_names_and_ids(tree):
    root, summary = tree
    assert sorted(p.name for p in root.iterdir()) == ["TESTING", "TRAINING", "patients.csv"]
    assert [d.name for d in case_dirs(root, TRAINING_DIR)] == [f"case_{i}" for i in range(1, 9)]
    assert [d.name for d in case_dirs(root, TESTING_DIR)] == ["case_1", "case_2"]
    assert summary == {
        "output_dir": str(root),
        "training": [f"case_{i}" for i in range(1, 9)],
        "testing": ["case_1", "case_2"],
        "patients_csv": str(root / "patients.csv"),
    }
    ids = []
    for split, keys in ((TRAINING_DIR, CHANNELS + (LABEL,)), (TESTING_DIR, CHANNELS)):
        for case in case_dirs(root, split):
            folders = sorted(case.iterdir(), key=lambda d: int(SMIR_NAME.match(d.name)["id"]))
            assert [SMIR_NAME.match(d.name)["mod"] for d in folders] == [TOKENS[k] for k in keys]
            for folder in folders:
                assert folder.name.startswith("SMIR.Brain.XX.O.")
                assert [p.name for p in folder.iterdir()] == [folder.name + ".nii"]
                ids.append(int(SMIR_NAME.match(folder.name)["id"]))
    assert len(ids) == 8 * 6 + 2 * 5
    assert ids == sorted(set(ids)), "SMIR ids must be unique and increase through the tree"


def test_patients_csv_lists_every_training_case(tree):
    root, _ = tree
    rows = read_rows(root / "patients.csv")
    assert rows[0] == ["case", "patient"]
    assert [case for case, _ in rows[1:]] == [f"case_{i}" for i in range(1, 9)]
    patients = [int(p.removeprefix("patient_")) for _, p in rows[1:]]
    assert patients[0] == 1 and all(b - a in (0, 1) for a, b in zip(patients, patients[1:]))
    assert len(set(patients)) < len(patients), "with two_slab_fraction=0.5 some patient should give two slabs"
    assert all(patients.count(p) <= 2 for p in patients)


def test_dtypes_and_value_ranges(tree):
    root, _ = tree
    for split in (TRAINING_DIR, TESTING_DIR):
        for case in case_dirs(root, split):
            images = load_case(case)
            for key, image in images.items():
                assert image.get_data_dtype() == DTYPES[key], (case, key)
                assert np.asanyarray(image.dataobj).dtype == DTYPES[key], (case, key)
            maps = arrays(images)
            ct, brain = maps["CT"], maps["MTT"] > 0
            assert ct.min() >= -1024 and 700 < ct.max() <= 3071
            assert ct[0, 0, 0] < -900, "air in the corner"
            assert 20 <= np.median(ct[brain]) <= 45
            for key in ("CBF", "CBV", "MTT", "Tmax"):
                assert maps[key].min() >= 0 and not maps[key][ct < -500].any(), f"{key} must be 0 outside the head"
            healthy = brain & (maps["Tmax"] < 4)
            assert 15 <= np.median(maps["CBF"][healthy]) <= 60
            assert 100 <= np.median(maps["CBV"][healthy]) <= 500  # 0.01 mL/100 g
            assert 3 <= np.median(maps["MTT"][healthy]) <= 6
            assert np.median(maps["Tmax"][brain]) < 2


def test_case_files_share_one_grid_with_anisotropic_spacing(tree):
    root, _ = tree
    depths = []
    for split in (TRAINING_DIR, TESTING_DIR):
        for case in case_dirs(root, split):
            images = list(load_case(case).values())
            shape, affine = images[0].shape, images[0].affine
            for image in images[1:]:
                assert image.shape == shape and np.array_equal(image.affine, affine), case
            assert shape[:2] == (IN_PLANE, IN_PLANE) and shape[2] in SLICES
            depths.append(shape[2])
            assert np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))) == 0
            dx, dy, dz = np.diag(affine)[:3]
            assert dx == dy and 215 <= dx * IN_PLANE <= 250
            assert 2 <= dz <= 12 and dz * shape[2] <= 120 + 1e-6
    assert len(set(depths)) > 1, "slab depths should vary between cases"


def test_in_plane_512_and_single_depth(tmp_path):
    generate(tmp_path, num_train=1, num_test=0, in_plane=512, slices=2)
    images = load_case(tmp_path / TRAINING_DIR / "case_1")
    assert {image.shape for image in images.values()} == {(512, 512, 2)}
    dx, _, dz = np.diag(images["CT"].affine)[:3]
    assert 0.4 <= dx <= 0.5 and dz / dx > 4
    assert np.asanyarray(images[LABEL].dataobj).any()


def test_every_training_case_shows_a_binary_lesion(tmp_path):
    generate(tmp_path, num_train=10, num_test=0, seed=7, in_plane=32, slices=2, two_slab_fraction=0.5)
    for maps in training_cases(tmp_path):
        assert maps["CT"].shape[2] == 2
        assert set(np.unique(maps[LABEL])) <= {0, 1}
        assert maps[LABEL].sum() >= 1


def test_lesion_is_hypoperfused(tree):
    root, _ = tree
    for maps in training_cases(root):
        lesion = maps[LABEL].astype(bool)
        healthy = (maps["MTT"] > 0) & ~lesion
        assert lesion.any()
        assert maps["CBF"][lesion].mean() < 0.5 * maps["CBF"][healthy].mean()
        assert maps["Tmax"][lesion].mean() > max(6.0, maps["Tmax"][healthy].mean() + 3)
        assert maps["MTT"][lesion].mean() > maps["MTT"][healthy].mean() + 3


def test_no_single_map_thresholds_to_the_label(tree):
    root, _ = tree
    best = {key: [] for key in CHANNELS}
    for maps in training_cases(root):
        brain = maps["MTT"] > 0
        label = maps[LABEL][brain].astype(np.int64)
        assert maps[LABEL][~brain].sum() == 0
        for key in CHANNELS:
            best[key].append(best_dice(maps[key][brain].astype(np.float64), label))
    for key, scores in best.items():
        assert max(scores) < 0.95, (key, scores)
    for key in ("CBF", "Tmax"):
        assert np.mean(best[key]) > 0.3, f"{key} should still be informative: {best[key]}"


def test_best_dice_helper_finds_a_perfect_threshold():
    label = np.array([0, 0, 1, 1, 0])
    assert best_dice(np.array([5.0, 4.0, 1.0, 2.0, 3.0]), label) == 1.0
    assert best_dice(np.array([1.0, 2.0, 5.0, 5.0, 3.0]), label) == 1.0
    assert best_dice(np.array([1.0, 5.0, 5.0, 2.0, 3.0]), label) < 1.0


def test_two_slab_patients_share_the_head_but_not_the_slab(tmp_path):
    generate(tmp_path, num_train=4, num_test=0, seed=2, in_plane=32, slices=(4, 8), two_slab_fraction=1.0)
    assert read_rows(tmp_path / "patients.csv")[1:] == [
        ["case_1", "patient_1"],
        ["case_2", "patient_1"],
        ["case_3", "patient_2"],
        ["case_4", "patient_2"],
    ]
    affines = [load_case(d)["CT"].affine for d in case_dirs(tmp_path, TRAINING_DIR)]
    for a, b in (affines[:2], affines[2:]):
        assert np.array_equal(a[:2], b[:2]), "same in-plane grid"
        assert a[2, 3] != b[2, 3], "different slab position"
    assert not np.array_equal(affines[0][:2], affines[2][:2]), "different patients, different grids"

    generate(
        tmp_path, num_train=3, num_test=0, seed=2, in_plane=32, slices=(4, 8), two_slab_fraction=0.0, overwrite=True
    )
    assert [p for _, p in read_rows(tmp_path / "patients.csv")[1:]] == ["patient_1", "patient_2", "patient_3"]


def test_deterministic_per_seed(tmp_path):
    kwargs = dict(num_train=3, num_test=1, in_plane=32, two_slab_fraction=0.5)
    generate(tmp_path / "a", seed=11, **kwargs)
    generate(tmp_path / "b", seed=11, **kwargs)
    generate(tmp_path / "c", seed=12, **kwargs)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    ct_a, ct_c = (next((tmp_path / n / TRAINING_DIR / "case_1").glob("*.CT.*/*.nii")).read_bytes() for n in "ac")
    assert ct_a != ct_c

    generate(tmp_path / "d", seed=11, num_train=1, num_test=0, in_plane=32, two_slab_fraction=0.5)
    first = {k: v for k, v in a.items() if k.startswith(f"{TRAINING_DIR}/case_1/")}
    assert first and first == {k: v for k, v in tree_bytes(tmp_path / "d").items() if k.startswith(TRAINING_DIR)}


def test_refuses_to_overwrite_unless_asked(tmp_path):
    generate(tmp_path, num_train=1, num_test=1, in_plane=32, seed=1)
    (tmp_path / "keep.txt").write_text("not the generator's")
    before = tree_bytes(tmp_path)
    with pytest.raises(FileExistsError, match=r"TRAINING.*--overwrite true"):
        generate(tmp_path, num_train=1, num_test=1, in_plane=32, seed=2)
    assert tree_bytes(tmp_path) == before

    (tmp_path / TRAINING_DIR / "stray.txt").write_text("x")
    generate(tmp_path, num_train=1, num_test=1, in_plane=32, seed=2, overwrite=True)
    after = tree_bytes(tmp_path)
    assert f"{TRAINING_DIR}/stray.txt" not in after and after["keep.txt"] == before["keep.txt"]
    assert after != before

    for folder in (TRAINING_DIR, TESTING_DIR):
        for case in (tmp_path / folder).iterdir():
            for f in case.rglob("*.nii"):
                f.unlink()
    with pytest.raises(FileExistsError, match="TRAINING"):  # non-empty even without any NIfTI
        generate(tmp_path, num_train=1, num_test=1, in_plane=32)


def test_refuses_with_only_testing_or_patients_csv(tmp_path):
    generate(tmp_path, num_train=0, num_test=1, in_plane=32)
    with pytest.raises(FileExistsError, match="TESTING"):
        generate(tmp_path, num_train=1, num_test=0, in_plane=32)
    generate(tmp_path, num_train=1, num_test=0, in_plane=32, overwrite=True)
    assert not any((tmp_path / TESTING_DIR).iterdir())
    (tmp_path / TRAINING_DIR).rename(tmp_path / "moved")
    with pytest.raises(FileExistsError, match="patients.csv"):
        generate(tmp_path, num_train=1, num_test=0, in_plane=32)


@pytest.mark.parametrize("kwargs", [{"in_plane": 8}, {"slices": (0, 2)}, {"num_train": -1}, {"two_slab_fraction": 1.5}])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate(tmp_path, **{"num_train": 1, "num_test": 0, "in_plane": 32, **kwargs})
    assert not (tmp_path / TRAINING_DIR).exists()


def test_cli_writes_the_same_tree_as_the_api(tmp_path):
    args = ["--num_train", "2", "--num_test", "1", "--seed", "5", "--in_plane", "32", "--slices", "[2,4]"]
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tools.synthetic_isles", "--output_dir", str(tmp_path / "cli"), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    generate(tmp_path / "api", num_train=2, num_test=1, seed=5, in_plane=32, slices=[2, 4])
    cli, api = tree_bytes(tmp_path / "cli"), tree_bytes(tmp_path / "api")
    assert len(cli) == 2 * 6 + 5 + 1 and cli == api
