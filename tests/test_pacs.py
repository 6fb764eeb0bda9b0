"""The PACS round trip on a real Orthanc (tests/orthanc.py): a synthetic study uploaded, pulled over DICOMweb,
segmented, its SEG and SR stored back and read back from Orthanc; the listener killed mid-study and restarted;
credentials only from a file; a bad study sends nothing."""

import json
import os
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
from conftest import TINY_NETWORK
from dicomweb_client import DICOMwebClient
from helpers import canonical, study_files
from orthanc import instances_of_study, orthanc_available, start_orthanc, upload
from scripts.dicom.series import case_of, volume_as_nifti

PACS = [sys.executable, "-m", "scripts.tools.pacs"]


@pytest.fixture()
def orthanc(tmp_path):
    available, reason = orthanc_available()
    if not available:
        pytest.skip(reason)
    with start_orthanc(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture(scope="module")
def tiny_settings(tmp_path_factory):
    """A config file of one's own, last on --config_file: the tiny network."""
    path = tmp_path_factory.mktemp("settings") / "tiny.json"
    path.write_text(json.dumps(TINY_NETWORK))
    return str(path)


def study_uid_of(folder):
    return str(pydicom.dcmread(study_files(folder)[0], stop_before_pixels=True).StudyInstanceUID)


def pacs(repo_root, *args, timeout=600):
    return subprocess.run([*PACS, *args], cwd=repo_root, capture_output=True, text=True, timeout=timeout, check=False)


def common_args(orthanc, tiny_model, tiny_settings, output_dir):
    return [
        "--dicomweb_url",
        orthanc.dicomweb_url,
        "--output_dir",
        str(output_dir),
        "--bundle_root",
        str(tiny_model),
        "--config_file",
        tiny_settings,
        "--credentials_file",
        orthanc.credentials_file,
    ]


def results_in_orthanc(orthanc, study_uid):
    """The study's SEG and SR instances in Orthanc, by modality."""
    found = {}
    for instance in instances_of_study(orthanc, study_uid):
        found.setdefault(instance["Modality"], []).append(instance)
    return found.get("SEG", []), found.get("SR", [])


def test_segment_pulls_a_study_and_stores_seg_and_sr_read_back_as_the_folder_run(
    repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tmp_path
):
    study_dir = dicom_tree / "dicom" / "TESTING" / "case_1"
    upload(orthanc, study_files(study_dir))
    study_uid = study_uid_of(study_dir)
    result = pacs(
        repo_root,
        "segment",
        "--study_uid",
        study_uid,
        *common_args(orthanc, tiny_model, tiny_settings, tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert orthanc.password not in result.stdout + result.stderr
    header = pydicom.dcmread(study_files(study_dir)[0], stop_before_pixels=True)
    written = [os.path.join(d, n) for d, dirs, names in os.walk(tmp_path / "out") for n in dirs + names]
    for secret in (str(header.PatientName), str(header.PatientID)):
        assert secret not in result.stdout + result.stderr and not any(secret in path for path in written)

    seg_instances, sr_instances = results_in_orthanc(orthanc, study_uid)
    assert len(seg_instances) == 1 and len(sr_instances) == 1
    session = requests.Session()
    session.auth = orthanc.auth
    client = DICOMwebClient(orthanc.dicomweb_url, session=session)
    seg = hd.seg.Segmentation.from_dataset(
        client.retrieve_instance(study_uid, seg_instances[0]["SeriesInstanceUID"], seg_instances[0]["SOPInstanceUID"])
    )
    case = case_of(study_uid)
    mask = nib.load(tmp_path / "out" / "results" / case / "predictions" / "masks" / f"{case}.nii.gz")
    array, affine = volume_as_nifti(seg.get_volume(combine_segments=True))
    assert np.array_equal(canonical(array.astype(np.uint8), affine)[0], canonical(mask.dataobj, mask.affine)[0])

    # the same command again is refused (its results are there); with --overwrite true the PACS still holds one of each
    again = pacs(
        repo_root,
        "segment",
        "--study_uid",
        study_uid,
        *common_args(orthanc, tiny_model, tiny_settings, tmp_path / "out"),
    )
    assert again.returncode == 1 and "--overwrite true" in again.stderr
    again = pacs(
        repo_root,
        "segment",
        "--study_uid",
        study_uid,
        "--overwrite",
        "true",
        *common_args(orthanc, tiny_model, tiny_settings, tmp_path / "out"),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert [len(x) for x in results_in_orthanc(orthanc, study_uid)] == [1, 1]


def test_a_bad_study_sends_nothing(repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tmp_path):
    study_dir = dicom_tree / "dicom" / "TESTING" / "case_2"
    files = [
        p
        for p in study_files(study_dir)
        if "Tmax" not in str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription)
    ]
    upload(orthanc, files)
    study_uid = study_uid_of(study_dir)
    before = instances_of_study(orthanc, study_uid)
    result = pacs(
        repo_root,
        "segment",
        "--study_uid",
        study_uid,
        *common_args(orthanc, tiny_model, tiny_settings, tmp_path / "out"),
    )
    assert result.returncode == 1 and "no series for Tmax" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert instances_of_study(orthanc, study_uid) == before


def test_credentials_never_on_the_command_line_and_unknown_flags_refused(repo_root, orthanc, tmp_path):
    url = orthanc.dicomweb_url.replace("http://", f"http://{orthanc.username}:{orthanc.password}@")
    one_study = ["segment", "--study_uid", "1.2.3", "--output_dir", str(tmp_path / "o")]
    result = pacs(repo_root, *one_study, "--dicomweb_url", url)
    assert result.returncode == 1 and "credentials" in result.stderr and orthanc.password not in result.stderr
    result = pacs(repo_root, *one_study, "--dicomweb_url", orthanc.dicomweb_url, "--password", "x")
    assert result.returncode == 2 and "unknown flag --password" in result.stderr
    assert not (tmp_path / "o").exists()
    # without credentials the PACS refuses, and nothing is written
    result = pacs(repo_root, *one_study, "--dicomweb_url", orthanc.dicomweb_url)
    assert result.returncode != 0 and "401" in result.stderr
    assert not (tmp_path / "o" / "results").exists()


def test_the_listener_killed_mid_study_and_restarted_loses_nothing_and_duplicates_nothing(
    repo_root, orthanc, dicom_tree, tiny_model, tiny_settings, tmp_path
):
    studies = [dicom_tree / "dicom" / "TESTING" / case for case in ("case_1", "case_2")]
    for study_dir in studies:
        upload(orthanc, study_files(study_dir))
    out = tmp_path / "listener"
    args = [
        "listen",
        "--orthanc_url",
        orthanc.url,
        "--poll_s",
        "0.5",
        *common_args(orthanc, tiny_model, tiny_settings, out),
    ]
    first = subprocess.Popen(
        [*PACS, *args], cwd=repo_root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:  # kill it once it is inside the first study
        if (out / "results").is_dir():
            break
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    second = subprocess.run(
        [*PACS, *args, "--until_idle", "true"], cwd=repo_root, capture_output=True, text=True, timeout=600, check=False
    )
    assert second.returncode == 0, second.stderr[-3000:]
    state = json.loads((out / "listener.json").read_text())
    for study_dir in studies:
        study_uid = study_uid_of(study_dir)
        assert state["studies"][case_of(study_uid)]["outcome"] == "stored"
        assert [len(x) for x in results_in_orthanc(orthanc, study_uid)] == [1, 1], study_dir.name
    # its own SEG and SR made each study stable again: those events were skipped, not segmented again
    assert "already handled with these series" in second.stdout + second.stderr


@pytest.mark.parametrize("content", ["", '{"since": 3', '{"since": 3}', "[1, 2]"])
def test_a_state_file_that_is_not_the_listeners_is_named_and_left_as_it_is(repo_root, tmp_path, content):
    """Refused before the PACS is asked anything (no server listens at these URLs)."""
    out = tmp_path / "listener"
    out.mkdir()
    state = out / "listener.json"
    state.write_text(content)
    result = pacs(
        repo_root,
        "listen",
        "--dicomweb_url",
        "http://127.0.0.1:9/dicom-web",
        "--orthanc_url",
        "http://127.0.0.1:9",
        "--output_dir",
        str(out),
    )
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {state}: not a listener state file"), line
    assert state.read_text() == content and sorted(os.listdir(out)) == ["listener.json"]
