"""The PACS round trip on a real Orthanc (tests/orthanc.py), in both of its OverwriteInstances settings where that
matters: a synthetic study uploaded, pulled over DICOMweb, segmented, its SEG and SR stored back and read back; only
whole studies segmented, a changed study done again, results of other settings stored as new objects; the listener
killed mid-study and restarted, never stopped by one study, stopped at once by a wrong setting, starting at the end of
the feed; credentials only from a file of mode 600; a bad study sends nothing. Every line that any command of these
tests prints, and every file name and text file it writes, is checked for the studies' UIDs, patient names and IDs."""

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient
from helpers import TINY_NETWORK, canonical, study_files
from orthanc import delete_instance, instances_of_study, orthanc_available, start_orthanc, upload
from pydicom.uid import JPEGLSLossless
from scripts.dicom.series import case_of, volume_as_nifti

PACS = [sys.executable, "-m", "scripts.tools.pacs"]
NO_SERVER = ["--dicomweb_url", "http://127.0.0.1:9/dicom-web"]  # nothing listens there
EVERYTHING_THEN_STOP = ["--until_idle", "true", "--backfill_from", "beginning"]  # a listener run over every study


def start(tmp_path, **settings):
    available, reason = orthanc_available()
    if not available:
        pytest.skip(reason)
    return start_orthanc(tmp_path / "orthanc", **settings)


@pytest.fixture()
def orthanc(tmp_path):
    with start(tmp_path) as server:
        yield server


@pytest.fixture(params=[True, False], ids=["OverwriteInstances", "KeepFirstInstance"])
def orthanc_both(request, tmp_path):
    """Orthanc with OverwriteInstances true (a re-sent instance replaces the stored one) and false (its default: the
    first copy is kept)."""
    with start(tmp_path, overwrite_instances=request.param) as server:
        server.overwrite_instances = request.param
        yield server


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory):
    """A config file of one's own, last on --config_file: the tiny network."""
    path = tmp_path_factory.mktemp("settings") / "tiny.json"
    path.write_text(json.dumps(TINY_NETWORK))
    return str(path)


def copy_study(dicom_tree, case, folder):
    """A copy of a synthetic study: {series description: [files in slice order]}."""
    shutil.copytree(dicom_tree / "dicom" / "TESTING" / case, folder)
    by_series = {}
    for path in study_files(folder):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(str(header.SeriesDescription), []).append((int(header.InstanceNumber), path))
    return {description: [p for _, p in sorted(items)] for description, items in by_series.items()}


def nct(by_series):
    return next(paths for description, paths in by_series.items() if "NCCT" in description)


def maps(by_series):
    return [path for description, paths in by_series.items() if "NCCT" not in description for path in paths]


def study_uid_of(files):
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def secrets_of(paths):
    """The identifiers of the DICOM files ``paths``: UIDs of studies, series and instances, patients' names and IDs."""
    found = set()
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientName", "PatientID"):
            value = str(header.get(keyword, "")).strip()
            if value:
                found.add(value)
    return found


@pytest.fixture(scope="module")
def tree_secrets(dicom_tree):
    return secrets_of(study_files(dicom_tree / "dicom"))


def assert_no_identifier(text, secrets, where):
    leaked = sorted(secret for secret in secrets if secret in text)
    assert not leaked, f"{where} names {leaked}"


def assert_no_identifier_in_files(folder, secrets):
    """No identifier in the name of anything under ``folder`` or in its text files (logs, JSON, CSV)."""
    for directory, dirs, names in os.walk(folder):
        for name in dirs + names:
            assert_no_identifier(name, secrets, os.path.join(directory, name))
        for name in names:
            if name.endswith((".json", ".csv", ".log", ".txt")):
                with open(os.path.join(directory, name), errors="replace") as f:
                    assert_no_identifier(f.read(), secrets, os.path.join(directory, name))


def pacs(repo_root, *args, secrets, timeout=600):
    """The command's finished process; none of ``secrets`` in anything it printed."""
    result = subprocess.run([*PACS, *args], cwd=repo_root, capture_output=True, text=True, timeout=timeout, check=False)
    assert_no_identifier(result.stdout + result.stderr, secrets, "the command's output")
    return result


def common_args(orthanc, tiny_model, tiny_settings, output_dir, *more_settings):
    return [
        "--dicomweb_url",
        orthanc.dicomweb_url,
        "--output_dir",
        str(output_dir),
        "--bundle_root",
        str(tiny_model),
        "--config_file",
        ",".join([tiny_settings, *map(str, more_settings)]),
        "--credentials_file",
        orthanc.credentials_file,
    ]


def listener_args(orthanc, tiny_model, tiny_settings, output_dir, *more):
    return [
        "listen",
        "--orthanc_url",
        orthanc.url,
        "--poll_s",
        "0.5",
        *common_args(orthanc, tiny_model, tiny_settings, output_dir),
        *more,
    ]


def results_in_orthanc(orthanc, study_uid):
    """The study's SEG and SR instances in Orthanc, by modality."""
    found = {}
    for instance in instances_of_study(orthanc, study_uid):
        found.setdefault(instance["Modality"], []).append(instance)
    return found.get("SEG", []), found.get("SR", [])


def client_of(orthanc):
    session = requests.Session()
    session.auth = orthanc.auth
    return DICOMwebClient(orthanc.dicomweb_url, session=session)


def read_back(orthanc, study_uid, instance):
    return client_of(orthanc).retrieve_instance(study_uid, instance["SeriesInstanceUID"], instance["SOPInstanceUID"])


def sr_figures(sr):
    """{concept meaning: value} of an SR's perfusion figures, and the names of the algorithms it holds (DCM 111001
    "Algorithm Name")."""
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    names, items = set(), list(sr.ContentSequence)
    while items:
        item = items.pop()
        if item.ConceptNameCodeSequence[0].CodeValue == "111001":
            names.add(str(item.TextValue))
        items.extend(item.get("ContentSequence", []))
    return {m.name.meaning: float(m.value) for m in group.get_measurements()}, names


def test_segment_stores_seg_and_sr_reads_them_back_and_other_settings_make_new_objects(
    repo_root, orthanc_both, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path
):
    orthanc = orthanc_both
    study_dir = dicom_tree / "dicom" / "TESTING" / "case_1"
    upload(orthanc, study_files(study_dir))
    study_uid = study_uid_of(study_files(study_dir))
    out = tmp_path / "out"
    segment = ["segment", "--study_uid", study_uid, "--orthanc_url", orthanc.url]

    def segment_with(*flags, settings=()):
        """``segment`` with ``flags`` and the config files ``settings`` after the tiny network's."""
        args = common_args(orthanc, tiny_model, tiny_settings, out, *settings)
        return pacs(repo_root, *segment, *flags, *args, secrets=tree_secrets)

    result = segment_with()
    assert result.returncode == 0, result.stderr[-3000:]
    assert " - WARNING - " not in result.stdout + result.stderr, "a site's config file brings no warning"
    assert orthanc.password not in result.stdout + result.stderr
    assert "the PACS holds what was sent" in result.stdout + result.stderr

    (seg_instance,), (sr_instance,) = results_in_orthanc(orthanc, study_uid)
    seg = hd.seg.Segmentation.from_dataset(read_back(orthanc, study_uid, seg_instance))
    case = case_of(study_uid)
    mask = nib.load(out / "results" / case / "predictions" / "masks" / f"{case}.nii.gz")
    array, affine = volume_as_nifti(seg.get_volume(combine_segments=True))
    assert np.array_equal(canonical(array.astype(np.uint8), affine)[0], canonical(mask.dataobj, mask.affine)[0])
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "ModifiedUNet"  # inference.json's network_name
    figures, algorithm = sr_figures(read_back(orthanc, study_uid, sr_instance))
    assert "Hypoperfused volume (Tmax > 6 s)" in figures and "ModifiedUNet" in algorithm

    # the same command again is refused (its results are there); with --overwrite true and the same settings the
    # objects are the same (same UIDs, same content): the PACS holds one of each, whichever copy it keeps
    again = segment_with()
    assert again.returncode == 1 and "--overwrite true" in again.stderr
    again = segment_with("--overwrite", "true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [len(x) for x in results_in_orthanc(orthanc, study_uid)] == [1, 1]

    # other thresholds and another network name: new objects beside the first ones, named after what made them
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"perfusion_thresholds#tmax_s": 4.0, "network_name": "OtherNet"}))
    again = segment_with("--overwrite", "true", settings=[other])
    assert again.returncode == 0, again.stderr[-3000:]
    segs, srs = results_in_orthanc(orthanc, study_uid)
    assert len(segs) == 2 and len(srs) == 2
    (new_sr,) = [sr for sr in srs if sr["SOPInstanceUID"] != sr_instance["SOPInstanceUID"]]
    figures, algorithm = sr_figures(read_back(orthanc, study_uid, new_sr))
    assert "Hypoperfused volume (Tmax > 4 s)" in figures and "Hypoperfused volume (Tmax > 6 s)" not in figures
    assert "OtherNet" in algorithm and "ModifiedUNet" not in algorithm
    written = pydicom.dcmread(out / "results" / case / "predictions" / "dicom" / case / "sr.dcm")
    assert written.SOPInstanceUID == new_sr["SOPInstanceUID"]
    assert_no_identifier_in_files(out, tree_secrets)


def test_a_pacs_that_keeps_another_object_under_the_results_uids_is_reported(
    repo_root, orthanc_both, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path
):
    """An earlier, different SEG under the UIDs of this run's SEG: replaced and verified where the server overwrites
    instances; else the command says that the PACS does not hold what was sent, and exits 1."""
    orthanc = orthanc_both
    study_dir = dicom_tree / "dicom" / "TESTING" / "case_2"
    upload(orthanc, study_files(study_dir))
    study_uid = study_uid_of(study_files(study_dir))
    out = tmp_path / "out"
    segment = ["segment", "--study_uid", study_uid, *common_args(orthanc, tiny_model, tiny_settings, out)]
    result = pacs(repo_root, *segment, secrets=tree_secrets)
    assert result.returncode == 0, result.stderr[-3000:]
    case = case_of(study_uid)
    seg_path = out / "results" / case / "predictions" / "dicom" / case / "seg.dcm"
    sent = pydicom.dcmread(seg_path)
    tampered = pydicom.dcmread(seg_path)
    tampered.PixelData = bytes(len(sent.PixelData))  # an empty mask under the same UIDs
    tampered_path = tmp_path / "tampered.dcm"
    tampered.save_as(tampered_path)
    delete_instance(orthanc, str(sent.SOPInstanceUID))
    upload(orthanc, [tampered_path])

    again = pacs(repo_root, *segment, "--overwrite", "true", secrets=tree_secrets)
    (seg_instance,), _ = results_in_orthanc(orthanc, study_uid)
    held = read_back(orthanc, study_uid, seg_instance)
    if orthanc.overwrite_instances:
        assert again.returncode == 0, again.stderr[-3000:]
        assert held.PixelData == sent.PixelData
        assert (out / "results" / case / "stored.json").is_file()
    else:
        assert again.returncode == 1 and "the PACS holds another object under the UIDs" in again.stderr
        assert (again.stderr.strip().splitlines()[-1]).startswith(f"error: {case}: the PACS holds another object")
        assert held.PixelData == tampered.PixelData
        assert not (out / "results" / case / "stored.json").exists()


def test_segment_takes_only_a_whole_study(repo_root, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path):
    """A study still arriving (Orthanc has not marked it stable), an NCCT with its last slices not there yet (the maps
    reach beyond it), and NCCT slices arriving odd-first (a regular series at twice the spacing) are refused, naming
    what is missing, and nothing is sent; the whole study is then segmented on all of its NCCT slices."""
    by_series = copy_study(dicom_tree, "case_1", tmp_path / "study")
    ct, study_uid = nct(by_series), study_uid_of(nct(by_series))
    odd_first = [path for number, path in enumerate(ct, start=1) if number % 2 == 1]
    with start(tmp_path, stable_age=3600) as orthanc:  # stable an hour after its last instance
        upload(orthanc, maps(by_series) + ct[:3])
        args = ["segment", "--study_uid", study_uid, *common_args(orthanc, tiny_model, tiny_settings, tmp_path / "o")]
        result = pacs(repo_root, *args, "--orthanc_url", orthanc.url, secrets=tree_secrets)
        assert result.returncode == 1 and "the study is still arriving" in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1
    with start(tmp_path / "second") as orthanc:
        upload(orthanc, maps(by_series) + ct[:3])
        args = ["segment", "--study_uid", study_uid, *common_args(orthanc, tiny_model, tiny_settings, tmp_path / "o")]
        result = pacs(repo_root, *args, secrets=tree_secrets)
        assert result.returncode == 1 and "the perfusion maps reach beyond the NCCT" in result.stderr, result.stderr
        assert "the NCCT is incomplete" in result.stderr and "Traceback" not in result.stderr
        assert results_in_orthanc(orthanc, study_uid) == ([], [])
    with start(tmp_path / "third") as orthanc:
        upload(orthanc, maps(by_series) + odd_first)
        args = ["segment", "--study_uid", study_uid, *common_args(orthanc, tiny_model, tiny_settings, tmp_path / "o")]
        result = pacs(repo_root, *args, secrets=tree_secrets)
        assert result.returncode == 1 and "lacks 2 slice(s)" in result.stderr and "2, 4 missing" in result.stderr
        assert results_in_orthanc(orthanc, study_uid) == ([], [])
        upload(orthanc, [path for path in ct if path not in odd_first])
        result = pacs(repo_root, *args, secrets=tree_secrets)
        assert result.returncode == 0, result.stderr[-3000:]
        (seg_instance,), _ = results_in_orthanc(orthanc, study_uid)
        seg = read_back(orthanc, study_uid, seg_instance)
        referenced = {
            item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        }
        assert referenced == {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in ct}


def test_a_bad_study_sends_nothing_and_an_unknown_one_is_named(
    repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path
):
    study_dir = dicom_tree / "dicom" / "TESTING" / "case_2"
    files = [
        p
        for p in study_files(study_dir)
        if "Tmax" not in str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription)
    ]
    upload(orthanc, files)
    study_uid = study_uid_of(files)
    before = instances_of_study(orthanc, study_uid)
    args = common_args(orthanc, tiny_model, tiny_settings, tmp_path / "out")
    result = pacs(repo_root, "segment", "--study_uid", study_uid, *args, secrets=tree_secrets)
    assert result.returncode == 1 and "no series for Tmax in the PACS's listing" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert instances_of_study(orthanc, study_uid) == before
    unknown = "1.2.826.0.1.3680043.8.498.1234567890"
    result = pacs(repo_root, "segment", "--study_uid", unknown, *args, secrets=tree_secrets | {unknown})
    assert result.returncode == 1 and f"{case_of(unknown)}: the PACS" in result.stderr
    assert "has no study of that StudyInstanceUID" in result.stderr


def test_credentials_only_from_a_file_of_yours_and_unknown_flags_refused(repo_root, orthanc, tmp_path):
    url = orthanc.dicomweb_url.replace("http://", f"http://{orthanc.username}:{orthanc.password}@")
    one_study = ["segment", "--study_uid", "1.2.3", "--output_dir", str(tmp_path / "o")]
    result = pacs(repo_root, *one_study, "--dicomweb_url", url, secrets=set())
    assert result.returncode == 1 and "credentials" in result.stderr and orthanc.password not in result.stderr
    result = pacs(repo_root, *one_study, "--dicomweb_url", orthanc.dicomweb_url, "--password", "x", secrets=set())
    assert result.returncode == 2 and "unknown flag --password" in result.stderr
    assert not (tmp_path / "o").exists()
    # without credentials the PACS refuses at the first question: one line, the status, the URL, what to check
    result = pacs(repo_root, *one_study, "--dicomweb_url", orthanc.dicomweb_url, secrets=set())
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "401" in line and orthanc.dicomweb_url in line and "credentials" in line, line
    assert not (tmp_path / "o" / "results").exists()

    credentials = tmp_path / "credentials"
    cases = {
        0o644: (f"{orthanc.username}:{orthanc.password}\n", "its mode is 0644"),
        0o666: (f"{orthanc.username}:{orthanc.password}\n", "its mode is 0666"),
        0o600: (f"\ufeff{orthanc.username}:{orthanc.password}\n", "byte-order mark"),
        0o400: (f"{orthanc.username}:{orthanc.password}\nsecond line\n", "more than one line"),
    }
    for mode, (text, expected) in cases.items():
        credentials.unlink(missing_ok=True)
        credentials.write_text(text, encoding="utf-8")
        credentials.chmod(mode)
        result = pacs(
            repo_root, *one_study, *NO_SERVER, "--credentials_file", str(credentials), secrets={orthanc.password}
        )
        (line,) = result.stderr.strip().splitlines()
        assert result.returncode == 1 and line.startswith(f"error: {credentials}: ") and expected in line, line
    credentials.chmod(0o600)
    credentials.write_text(f"{orthanc.username}:{orthanc.password}\n")
    result = pacs(
        repo_root,
        "segment",
        "--study_uid",
        "1.2.3",
        "--output_dir",
        str(tmp_path / "o"),
        "--dicomweb_url",
        orthanc.dicomweb_url,
        "--credentials_file",
        str(credentials),
        secrets={orthanc.password},
    )
    assert result.returncode == 1 and "has no study of that StudyInstanceUID" in result.stderr, result.stderr[-2000:]


def test_the_listener_killed_mid_study_and_restarted_loses_nothing_and_duplicates_nothing(
    repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path
):
    studies = [dicom_tree / "dicom" / "TESTING" / case for case in ("case_1", "case_2")]
    for study_dir in studies:
        upload(orthanc, study_files(study_dir))
    out = tmp_path / "listener"
    args = [*listener_args(orthanc, tiny_model, tiny_settings, out), "--backfill_from", "beginning"]
    first = subprocess.Popen([*PACS, *args], cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:  # kill it once it is inside the first study
        if (out / "results").is_dir():
            break
        time.sleep(0.05)
    assert first.poll() is None, first.stdout.read()[-3000:]
    first.send_signal(signal.SIGKILL)
    assert_no_identifier(first.communicate(timeout=30)[0], tree_secrets, "the killed listener's output")
    second = pacs(
        repo_root, *listener_args(orthanc, tiny_model, tiny_settings, out), "--until_idle", "true", secrets=tree_secrets
    )
    assert second.returncode == 0, second.stderr[-3000:]
    state = json.loads((out / "listener.json").read_text())
    for study_dir in studies:
        study_uid = study_uid_of(study_files(study_dir))
        assert state["studies"][case_of(study_uid)]["outcome"] == "stored"
        assert [len(x) for x in results_in_orthanc(orthanc, study_uid)] == [1, 1], study_dir.name
    # its own SEG and SR made each study stable again: those events were skipped, not segmented again
    assert "already handled with these series" in second.stdout + second.stderr
    assert_no_identifier_in_files(out, tree_secrets)


def test_the_listener_starts_at_the_end_of_the_feed_unless_told_to_backfill(
    repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path
):
    files = study_files(dicom_tree / "dicom" / "TESTING" / "case_1")
    upload(orthanc, files)
    time.sleep(2)  # stable: its StableStudy change is in the feed
    out = tmp_path / "listener"
    result = pacs(
        repo_root, *listener_args(orthanc, tiny_model, tiny_settings, out), "--until_idle", "true", secrets=tree_secrets
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "listening from the end of Orthanc's change feed" in result.stdout + result.stderr
    assert json.loads((out / "listener.json").read_text())["studies"] == {}
    assert results_in_orthanc(orthanc, study_uid_of(files)) == ([], [])
    for day, stored in (("2999-01-01", False), (datetime.date.today().isoformat(), True)):
        result = pacs(
            repo_root,
            *listener_args(orthanc, tiny_model, tiny_settings, out),
            "--until_idle",
            "true",
            "--backfill_from",
            day,
            secrets=tree_secrets,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert [len(x) for x in results_in_orthanc(orthanc, study_uid_of(files))] == ([1, 1] if stored else [0, 0])
    result = pacs(
        repo_root,
        *listener_args(orthanc, tiny_model, tiny_settings, out),
        "--backfill_from",
        "yesterday",
        secrets=tree_secrets,
    )
    assert result.returncode == 1 and "--backfill_from must be 'beginning' or a date" in result.stderr


def test_a_study_arriving_in_parts_is_refused_then_done_when_whole(
    repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path
):
    """The NCCT's last slices arrive after a pause longer than StableAge: the first StableStudy finds the maps
    reaching beyond the NCCT (refused, recorded with what will happen); the rest arriving changes the study's
    fingerprint (its instance counts), and the listener does it again, on all its slices."""
    by_series = copy_study(dicom_tree, "case_2", tmp_path / "study")
    ct, study_uid = nct(by_series), study_uid_of(nct(by_series))
    out = tmp_path / "listener"
    args = [*listener_args(orthanc, tiny_model, tiny_settings, out), "--until_idle", "true"]
    upload(orthanc, maps(by_series) + ct[:4])
    result = pacs(repo_root, *args, "--backfill_from", "beginning", secrets=tree_secrets)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads((out / "listener.json").read_text())["studies"][case_of(study_uid)]["outcome"]
    assert outcome.startswith("refused:") and "reach beyond the NCCT" in outcome
    assert "It is done again when its instances change" in result.stdout + result.stderr
    assert results_in_orthanc(orthanc, study_uid) == ([], [])
    upload(orthanc, ct[4:])
    result = pacs(repo_root, *args, secrets=tree_secrets)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "listener.json").read_text())["studies"][case_of(study_uid)]["outcome"] == "stored"
    (seg_instance,), _ = results_in_orthanc(orthanc, study_uid)
    seg = read_back(orthanc, study_uid, seg_instance)
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(ct)


def test_a_study_refused_under_the_rules_is_done_again_once_the_rules_are_fixed(
    repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path
):
    by_series = copy_study(dicom_tree, "case_1", tmp_path / "study")
    for path in by_series["RAPID CBF"]:
        dataset = pydicom.dcmread(path)
        dataset.SeriesDescription = "PERF FLOW"
        dataset.save_as(path)
    files = study_files(tmp_path / "study")
    upload(orthanc, files)
    study_uid, out = study_uid_of(files), tmp_path / "listener"
    args = listener_args(orthanc, tiny_model, tiny_settings, out, *EVERYTHING_THEN_STOP)
    result = pacs(repo_root, *args, secrets=tree_secrets)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads((out / "listener.json").read_text())["studies"][case_of(study_uid)]["outcome"]
    assert "no series for CBF in the PACS's listing" in outcome and "set site_series_rules" in outcome
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"site_series_rules#CBF": {"description": "^PERF FLOW$"}}))
    args = listener_args(orthanc, tiny_model, tiny_settings, out)
    args[args.index("--config_file") + 1] += f",{site}"
    result = pacs(repo_root, *args, "--until_idle", "true", secrets=tree_secrets)  # restarted: no new change
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "listener.json").read_text())["studies"][case_of(study_uid)]["outcome"] == "stored"
    assert [len(x) for x in results_in_orthanc(orthanc, study_uid)] == [1, 1]


def test_one_failing_study_never_stops_the_listener(
    repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tree_secrets, tmp_path
):
    """A study whose CBF pixel data cannot be decoded (a JPEG-LS stream cut inside) fails inside the run: recorded
    with its reason, and the next study, which lacks the Type 2 patient and study attributes and has a one-component
    patient name, is segmented and stored (its SEG and SR carry the attributes empty)."""
    broken = copy_study(dicom_tree, "case_1", tmp_path / "broken")
    for path in broken["RAPID CBF"]:
        dataset = pydicom.dcmread(path)
        dataset.compress(JPEGLSLossless)
        fragment = pydicom.encaps.generate_fragments(dataset.PixelData)
        frame = next(fragment)
        dataset.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 3]])
        dataset.save_as(path)
    bare = copy_study(dicom_tree, "case_2", tmp_path / "bare")
    for path in study_files(tmp_path / "bare"):
        dataset = pydicom.dcmread(path)
        for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            if keyword in dataset:
                delattr(dataset, keyword)
        dataset.PatientName = "DOEJOHN"
        dataset.save_as(path)
    assert bare  # its files were rewritten
    secrets = tree_secrets | {"DOEJOHN"}
    out = tmp_path / "listener"
    upload(orthanc, study_files(tmp_path / "broken"))
    upload(orthanc, study_files(tmp_path / "bare"))
    args = listener_args(orthanc, tiny_model, tiny_settings, out, *EVERYTHING_THEN_STOP)
    result = pacs(repo_root, *args, secrets=secrets)
    assert result.returncode == 0, result.stderr[-3000:]
    studies = json.loads((out / "listener.json").read_text())["studies"]
    broken_uid, bare_uid = study_uid_of(study_files(tmp_path / "broken")), study_uid_of(study_files(tmp_path / "bare"))
    assert studies[case_of(broken_uid)]["outcome"].startswith(("failed:", "refused:"))
    assert results_in_orthanc(orthanc, broken_uid) == ([], [])
    assert studies[case_of(bare_uid)]["outcome"] == "stored"
    (seg_instance,), (sr_instance,) = results_in_orthanc(orthanc, bare_uid)
    for instance in (seg_instance, sr_instance):
        held = read_back(orthanc, bare_uid, instance)
        assert held.PatientBirthDate == "" and held.AccessionNumber == "" and str(held.PatientName) == "DOEJOHN"
    assert_no_identifier_in_files(out, secrets)


def test_a_wrong_setting_stops_the_listener_at_once_with_one_line(
    repo_root, orthanc, tiny_model, tiny_settings, tmp_path
):
    wrong = tmp_path / "wrong"
    wrong.write_text(f"{orthanc.username}:not-the-password\n")
    wrong.chmod(0o600)
    settings = ["--output_dir", str(tmp_path / "out"), "--bundle_root", str(tiny_model), "--config_file", tiny_settings]
    cases = [
        (
            ["--credentials_file", str(wrong), "--orthanc_url", orthanc.url, "--dicomweb_url", orthanc.dicomweb_url],
            "401",
            orthanc.dicomweb_url,
        ),
        (
            [
                "--credentials_file",
                orthanc.credentials_file,
                "--orthanc_url",
                orthanc.url + "/nowhere",
                "--dicomweb_url",
                orthanc.dicomweb_url,
            ],
            "404",
            orthanc.url + "/nowhere/changes",
        ),
        (
            [
                "--credentials_file",
                orthanc.credentials_file,
                "--orthanc_url",
                "http://127.0.0.1:9",
                "--dicomweb_url",
                orthanc.dicomweb_url,
            ],
            "no answer",
            "http://127.0.0.1:9",
        ),
    ]
    for flags, expected, url in cases:
        start_s = time.monotonic()
        result = pacs(repo_root, "listen", *flags, *settings, timeout=120, secrets=set())
        (line,) = result.stderr.strip().splitlines()
        assert result.returncode == 1 and expected in line and url in line and "check" in line, line
        assert time.monotonic() - start_s < 60
        assert orthanc.password not in line


@pytest.mark.parametrize("content", ["", '{"since": 3', '{"since": 3}', "[1, 2]"])
def test_a_state_file_that_is_not_the_listeners_is_named_and_left_as_it_is(repo_root, tmp_path, content):
    """Refused before the PACS is asked anything (no server listens at these URLs)."""
    out = tmp_path / "listener"
    out.mkdir()
    state = out / "listener.json"
    state.write_text(content)
    result = pacs(
        repo_root, "listen", *NO_SERVER, "--orthanc_url", "http://127.0.0.1:9", "--output_dir", str(out), secrets=set()
    )
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {state}: not a listener state file"), line
    assert state.read_text() == content and sorted(os.listdir(out)) == ["listener.json"]
