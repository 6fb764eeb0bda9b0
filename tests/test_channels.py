"""scripts/data/channels.py: each input declared once, and everything that knows the inputs reads them there; adding
one is an entry in SPEC and a profile that lists it (docs/architecture.md, "Where to change what")."""

import glob
import json
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from helpers import raised_messages, study_files
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose
from scripts.data import channels
from scripts.data.channels import CHANNELS, Channel, check_channels, series_rules
from scripts.data.datalist import build_datalist, find_inputs
from scripts.synthetic.dicom_studies import series_description
from scripts.synthetic.isles import generate, generate_isles24
from scripts.tools.make_studies import convert

TINY = {"features": [2, 4, 8, 16, 32], "spatial_size": [32, 32, 16], "num_workers": 0}
# a permeability-surface map, as some perfusion software exports it: the sixth input of these tests
PS = Channel(
    "PS",
    isles18=("CT_PS",),
    isles24="derivatives/perfusion-maps/space-ncct_ps",
    series_rule={"modality": ["CT", "OT"], "description": "\\bps\\b|permeab", "exclude": "<|%|thresh|mask"},
)


def six_channel_model(repo_root, bundle_root, config_names):
    """The bundle's configs ``config_names`` and a profile listing the six inputs, and a tiny 6-channel network saved
    as ``bundle_root/models/model.pt``; returns the config files."""
    profile = bundle_root / "ps.json"
    profile.write_text(json.dumps({"channels": [*CHANNELS, "PS"]}))
    configs = [os.path.join(repo_root, "configs", name) for name in config_names] + [str(profile)]
    parser = ConfigParser()
    parser.read_config(configs)
    parser.update(TINY)
    network = parser.get_parsed_content("network_def")
    assert next(w for w in network.parameters() if w.dim() == 5).shape[1] == 6, "in_channels follows the channels"
    (bundle_root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(network.state_dict(), bundle_root / "models" / "model.pt")
    return configs


def test_the_required_inputs_come_first_and_an_optional_one_after_them():
    assert CHANNELS == ("CT", "CBF", "CBV", "MTT", "Tmax") and channels.NCCT == "CT"
    check_channels([*CHANNELS, "CTA"])
    for wrong in ([*CHANNELS[:4]], [*CHANNELS, "CTA", "CTA"], ["CBF", "CT", *CHANNELS[2:]], [*CHANNELS, "PS"]):
        with pytest.raises(ValueError, match="the model's inputs are CT, CBF, CBV, MTT, Tmax, in that order"):
            check_channels(wrong)


def test_a_sites_series_rule_changes_only_the_tests_it_gives():
    rules = series_rules([*CHANNELS, "CTA"], {"CBF": {"description": "^PERF FLOW$"}})
    assert list(rules) == [*CHANNELS, "CTA", "CTP"] and rules["CTA"] == channels.channel("CTA").series_rule
    assert rules["CTP"] == channels.RAW_CTP.series_rule  # the raw perfusion series the maps can be computed from
    assert rules["CBF"] == {**channels.channel("CBF").series_rule, "description": "^PERF FLOW$"}
    with pytest.raises(ValueError, match="no input named CFB; scripts/data/channels.py declares"):
        series_rules(CHANNELS, {"CFB": {"description": "flow"}})


def test_a_sixth_input_is_one_spec_entry_and_a_profile(repo_root, tmp_path, monkeypatch):
    """PS added to SPEC (and nowhere else), a profile listing it: the generator writes it in both releases' layouts,
    the datalists list it, the DICOM rules hold it, and inference.json segments with a 6-channel network."""
    monkeypatch.setattr(channels, "SPEC", channels.SPEC + (PS,))
    six = [*CHANNELS, "PS"]
    isles18_root, isles24_root = tmp_path / "isles18", tmp_path / "isles24"
    generate(str(isles18_root), num_train=4, num_test=2, seed=1, in_plane=32, slices=(4, 8))
    generate_isles24(str(isles24_root), num_train=2, num_test=1, seed=1, in_plane=32, slices=16)
    assert glob.glob(str(isles18_root / "TESTING" / "case_1" / "SMIR.Brain.XX.O.CT_PS.*" / "*.nii"))
    for root in (isles18_root, isles24_root):
        datalist = build_datalist(str(root), folds=2, seed=0, check=True, channels=six)
        assert datalist["channels"] == six and all(len(i["image"]) == 6 for i in datalist["training"])
    (item,) = [i for i in find_inputs(str(isles24_root), channels=six) if i["case"].endswith("0003")]
    assert item["image"][5].endswith("_space-ncct_ps.nii.gz")
    assert np.array_equal(nib.load(item["image"][5]).get_fdata(), nib.load(item["image"][1]).get_fdata())
    assert series_rules(six)["PS"] == PS.series_rule

    configs = six_channel_model(repo_root, tmp_path, ["inference.json"])
    infer = ConfigWorkflow(
        config_file=configs,
        meta_file=os.path.join(repo_root, "configs", "metadata.json"),
        workflow_type="infer",
        bundle_root=str(tmp_path),
        dataset_dir=str(isles18_root),
        **TINY,
    )
    infer.initialize()
    loaded = infer.parser.get_parsed_content("preprocessing")(infer.parser.get_parsed_content("datalist")[0])
    assert loaded["image"].shape[0] == 6
    infer.run()
    infer.finalize()
    masks = sorted(os.listdir(tmp_path / "runs" / "predictions" / "masks"))
    assert masks == ["case_1.nii.gz", "case_2.nii.gz"]
    ct = nib.load(find_inputs(str(isles18_root), channels=six)[0]["image"][0])
    assert nib.load(tmp_path / "runs" / "predictions" / "masks" / "case_1.nii.gz").shape == ct.shape


def test_a_sixth_input_reaches_the_dicom_studies_and_make_studies(repo_root, tmp_path, monkeypatch):
    """The same PS entry, and nothing else: the synthetic DICOM studies hold a PS series that its rule finds, DICOM
    inference with the profile reads six series and segments, and make_studies --channels writes 6-channel studies."""
    monkeypatch.setattr(channels, "SPEC", channels.SPEC + (PS,))
    six = [*CHANNELS, "PS"]
    root = tmp_path / "isles18"
    generate(str(root), num_train=1, num_test=1, seed=2, in_plane=32, slices=(4,), dicom=True)
    study = root / "dicom" / "TESTING" / "case_1"
    described = {pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription for f in study_files(study)}
    assert described == {series_description(name) for name in six} and "PS" in described

    configs = six_channel_model(repo_root, tmp_path, ["inference.json", "dicom.json"])
    infer = ConfigWorkflow(
        config_file=configs,
        meta_file=os.path.join(repo_root, "configs", "metadata.json"),
        workflow_type="infer",
        bundle_root=str(tmp_path),
        dataset_dir=str(study.parent),
        **TINY,
    )
    infer.initialize()
    (item,) = infer.parser.get_parsed_content("datalist")
    assert [series.description for series in item["image"]] == [series_description(name) for name in six]
    image = infer.parser.get_parsed_content("preprocessing")(item)["image"]
    assert image.shape[0] == 6 and torch.equal(image[5], image[1]), "PS is the generator's copy of CBF"
    infer.run()
    infer.finalize()
    assert os.listdir(tmp_path / "runs" / "predictions" / "masks") == [f"{item['case']}.nii.gz"]

    written = convert(str(root), str(tmp_path / "studies"), sections="TESTING", channels=six)
    stacked = nib.load(written["testing_case_1"])
    (ps_file,) = find_inputs(str(root / "TESTING"), channels=six)[0]["image"][5:]
    assert stacked.shape[-1] == 6 and stacked.header["descrip"].tobytes().decode().rstrip("\x00").endswith(",PS")
    assert np.array_equal(stacked.get_fdata(dtype=np.float32)[..., 5], nib.load(ps_file).get_fdata(dtype=np.float32))


def test_map_normalisation_window_reads_each_map_in_its_fixed_window(repo_root, synthetic_tree, tmp_path):
    """`map_normalisation` "window" (the ISLES 2024 entries' windows, configs/isles24_native.json): CBF and CBV as a
    fraction of their mean over healthy tissue (Tmax <= 6 s, as the threshold core's reference) over 0-400 %, MTT and
    Tmax over 0-20 s, the CT in `ct_window`; "zscore" z-scores the maps; any other value is refused."""
    item = find_inputs(synthetic_tree)[0]
    read = {c: np.asarray(nib.load(path).dataobj, dtype=np.float64) for c, path in zip(CHANNELS, item["image"])}
    healthy = (read["Tmax"] <= 6.0) & (read["CBF"] > 0)
    assert healthy.any() and (read["Tmax"] > 6.0).any()  # a case with healthy and hypoperfused tissue

    def on_the_read_grid(map_normalisation, item=item):
        """The pipeline of configs/inference.json up to the channels' concatenation (before any resampling)."""
        parser = ConfigParser()
        parser.read_config(os.path.join(repo_root, "configs", "inference.json"))
        parser["map_normalisation"] = map_normalisation
        transforms = parser.get_parsed_content("preprocessing_transforms")
        upto = next(i for i, t in enumerate(transforms) if type(t).__name__ == "ConcatItemsd")
        return Compose(transforms[: upto + 1])(dict(item))["image"].numpy().astype(np.float64)

    image = on_the_read_grid("window")
    expected = {
        "CT": (read["CT"] - 20.0) / 40.0,  # ct_window [20, 60]
        "CBF": read["CBF"] / read["CBF"][healthy].mean() / 4.0,
        "CBV": read["CBV"] / read["CBV"][(read["Tmax"] <= 6.0) & (read["CBV"] > 0)].mean() / 4.0,
        "MTT": read["MTT"] / 20.0,
        "Tmax": read["Tmax"] / 20.0,
    }
    for i, name in enumerate(CHANNELS):
        np.testing.assert_allclose(image[i], np.clip(expected[name], 0, 1), atol=1e-5, err_msg=name)
    assert 0.2 < image[1][healthy].mean() < 0.3  # healthy CBF reads as 100 % of itself

    zscored = on_the_read_grid("zscore")
    for i, name in enumerate(CHANNELS[1:], start=1):
        inside = read[name] != 0
        assert abs(zscored[i][inside].mean()) < 1e-4 and abs(zscored[i][inside].std() - 1) < 1e-3, name
    # a Tmax map in tenths of a second: the windows would read it as 10x longer; refused, naming the case
    tenths = tmp_path / "tmax_tenths.nii.gz"
    nib.save(nib.Nifti1Image((10 * read["Tmax"]).astype(np.float32), nib.load(item["image"][4]).affine), tenths)
    with pytest.raises(Exception) as excinfo:
        on_the_read_grid("window", {**item, "image": [*item["image"][:4], str(tenths)]})
    assert f"ValueError: {item['case']}: the Tmax map is not in seconds" in raised_messages(excinfo)
    with pytest.raises(Exception) as excinfo:
        on_the_read_grid("minmax")
    assert "ValueError: map_normalisation 'minmax': expected one of zscore, window" in raised_messages(excinfo)
