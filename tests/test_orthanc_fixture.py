"""tests/orthanc.py: a real Orthanc started in a temp folder stores an uploaded instance, finds it by its study,
refuses requests without the credentials, and ends when stopped."""

import json
import os
import stat

import pydicom
import pytest
import requests
from orthanc import instances_of_study, orthanc_available, start_orthanc, upload
from pydicom.data import get_testdata_file


@pytest.fixture
def orthanc(tmp_path):
    ok, reason = orthanc_available()
    if not ok:
        pytest.skip(reason)
    server = start_orthanc(tmp_path)
    yield server
    server.stop()


def test_upload_find_and_stop(orthanc, tmp_path):
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    (answer,) = upload(orthanc, [path])
    assert answer["Status"] == "Success"
    assert instances_of_study(orthanc, ds.StudyInstanceUID) == [
        {"SOPInstanceUID": ds.SOPInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID, "Modality": "CT"}
    ]
    assert instances_of_study(orthanc, "1.2.3.4") == []
    # OverwriteInstances: the same instance sent again replaces the stored one, no second copy
    upload(orthanc, [path])
    assert len(instances_of_study(orthanc, ds.StudyInstanceUID)) == 1
    assert orthanc.get_json("/statistics")["CountInstances"] == 1

    for url in (orthanc.url + "/system", orthanc.dicomweb_url + "/studies"):
        assert requests.get(url, timeout=10).status_code == 401, url
        assert requests.get(url, auth=(orthanc.username, "wrong"), timeout=10).status_code == 401, url
    assert requests.get(orthanc.dicomweb_url + "/studies", auth=orthanc.auth, timeout=10).status_code == 200

    with open(orthanc.credentials_file) as f:
        assert f.read() == f"{orthanc.username}:{orthanc.password}\n"
    assert stat.S_IMODE(os.stat(orthanc.credentials_file).st_mode) == 0o600
    assert os.path.dirname(orthanc.log_path) == str(tmp_path)

    assert orthanc.stop() == 0
    assert orthanc.process.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(orthanc.url + "/system", auth=orthanc.auth, timeout=5)


@pytest.mark.parametrize("overwrite", [True, False])
def test_overwrite_instances_replaces_or_keeps_the_first_copy(tmp_path, overwrite):
    ok, reason = orthanc_available()
    if not ok:
        pytest.skip(reason)
    path = get_testdata_file("CT_small.dcm")
    changed = pydicom.dcmread(path)
    changed.SeriesDescription = "changed"
    changed.save_as(tmp_path / "changed.dcm")
    with start_orthanc(tmp_path / "server", overwrite_instances=overwrite, stable_age=3) as orthanc:
        assert json.loads(open(orthanc.config_path).read())["StableAge"] == 3
        upload(orthanc, [path])
        upload(orthanc, [tmp_path / "changed.dcm"])
        (instance,) = orthanc.get_json("/instances")
        tags = orthanc.get_json(f"/instances/{instance}/simplified-tags")
        assert tags.get("SeriesDescription", "") == (
            "changed" if overwrite else pydicom.dcmread(path).get("SeriesDescription", "")
        )
