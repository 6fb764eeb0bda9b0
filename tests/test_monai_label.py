"""A real MONAI Label 0.8.5 server (its stock `monaibundle` sample app) serving this bundle over HTTP.

The server runs from the separate MONAI Label environment (``.venv-monailabel``, built by ``scripts/tools/monailabel-env``
from ``requirements-monailabel.txt``; docs/monai_label.md): nothing is installed here. The test copies the sample app
and the bundle (configs with the tiny test network written into them, a tiny model trained here) to a temp dir, fills
a studies folder with synthetic 5-channel studies made by ``scripts.tools.make_studies``, starts ``monailabel.main
start_server`` on 127.0.0.1 and a free port, and checks ``/info/``, ``/infer/<model>`` (by datastore id and by upload)
against a direct ``run`` of the same inference.json, then MONAI Label's own training entry (``BundleTrainTask``,
``POST /train/<model>``) on the studies' labels, and that the server then serves the retrained weights.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from scripts.data.isles18 import read_case
from scripts.synthetic.isles import generate
from scripts.tools.make_studies import convert
from scripts.tools.monailabel_app import install

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML_PYTHON = os.environ.get("MONAILABEL_PYTHON") or os.path.join(REPO_ROOT, ".venv-monailabel", "bin", "python")
ML_VERSION = "0.8.5"
MODEL = "isles_ctp"
TINY = {"features": [2, 4, 8, 16, 32], "spatial_size": [32, 32, 16], "num_workers": 0}
TINY_TRAIN = {**TINY, "batch_size": 1, "val_interval": 1, "cache_rate": 1.0, "learning_rate": 0.01}
TRAIN_CASES = [f"case_{i}" for i in range(1, 7)]  # studies with labels/final labels; 5-6 are the direct run's fold 0
TARGET = "case_7"  # the study inferred over HTTP: unlabelled in the datastore, stored mirrored (LPS)
START_TIMEOUT, INFER_TIMEOUT, TRAIN_TIMEOUT = 240, 180, 600  # seconds


def _monailabel_prefix():
    """sys.prefix of the MONAI Label environment (the sample apps live under it), or a reason why it is unusable."""
    if not os.path.isfile(ML_PYTHON):
        return None, f"no MONAI Label environment at {ML_PYTHON}: build it with `bash scripts/tools/monailabel-env`"
    probe = "import sys, importlib.metadata as m; print(sys.prefix); print(m.version('monailabel'))"
    result = subprocess.run([ML_PYTHON, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2 or lines[1] != ML_VERSION:
        return None, f"{ML_PYTHON} has no monailabel {ML_VERSION}: {result.stdout + result.stderr}"[-500:]
    return lines[0], None


@pytest.fixture(scope="module")
def ml_prefix():
    prefix, reason = _monailabel_prefix()
    if prefix is None:
        if os.environ.get("CI") == "true":  # .ci/run builds the environment: its absence there is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    return prefix


def write_json(path, content):
    with open(path, "w") as f:
        json.dump(content, f, indent=4)


@pytest.fixture(scope="module")
def isles(tmp_path_factory):
    """A synthetic ISLES tree of 7 training cases (one slab each) at 48 x 48 in-plane."""
    root = tmp_path_factory.mktemp("isles")
    generate(str(root), num_train=7, num_test=0, seed=11, in_plane=48, slices=(4, 8), two_slab_fraction=0.0)
    return root


@pytest.fixture(scope="module")
def studies(isles, tmp_path_factory):
    """A MONAI Label studies folder: case_1..6 with labels in labels/final, and TARGET without label, mirrored
    along x and y (stored LPS), so that the mask must come back on the study's own grid. Returns the folder and
    TARGET's lesion (OT) mirrored the same way."""
    folder = tmp_path_factory.mktemp("studies")
    for case in TRAIN_CASES:
        convert(str(isles / "TRAINING" / case), str(folder), labels=True)
    raw = tmp_path_factory.mktemp("raw")
    convert(str(isles / "TRAINING" / TARGET), str(raw))
    lps = [[0, -1], [1, -1], [2, 1]]
    study = nib.load(raw / f"{TARGET}.nii.gz").as_reoriented(lps)
    nib.save(study, folder / f"{TARGET}.nii.gz")
    label = nib.load(read_case(TARGET, str(isles / "TRAINING" / TARGET), with_label=True)["label"])
    lesion = np.asanyarray(label.as_reoriented(lps).dataobj) > 0
    assert nib.aff2axcodes(study.affine) == ("L", "P", "S") and lesion.any()
    return folder, lesion


@pytest.fixture(scope="module")
def app(ml_prefix, isles, tmp_path_factory):
    """The stock monaibundle app with this bundle in model/MODEL, set up by scripts.tools.monailabel_app with a tiny model
    trained here (on case_1..6, fold 0 = case_5, case_6) and the tiny network written into the copy's configs
    (MONAI Label reads configs/inference.json and configs/train.json only)."""
    trained = tmp_path_factory.mktemp("trained")
    datalist = trained / "datalist.json"
    items = [
        dict(read_case(case, str(isles / "TRAINING" / case), with_label=True), fold=int(i < 4))
        for i, case in enumerate(TRAIN_CASES)
    ]
    write_json(datalist, {"training": items})
    wf = ConfigWorkflow(
        config_file=os.path.join(REPO_ROOT, "configs", "train.json"),
        workflow_type="train",
        meta_file=os.path.join(REPO_ROOT, "configs", "metadata.json"),
        bundle_root=str(trained),
        dataset_dir=str(isles),
        data_list_file_path=str(datalist),
        **{**TINY_TRAIN, "epochs": 24, "val_interval": 4},
    )
    wf.initialize()
    wf.run()
    wf.finalize()

    app_dir = tmp_path_factory.mktemp("app") / "isles-app"
    settings = {k: v for k, v in TINY_TRAIN.items() if k not in ("features", "spatial_size")}
    bundle = Path(
        install(
            str(app_dir),
            str(trained / "models" / "model.pt"),
            MODEL,
            features=TINY["features"],
            spatial_size=TINY["spatial_size"],
            settings=settings,
            sample_app=os.path.join(ml_prefix, "monailabel", "sample-apps", "monaibundle"),
        )
    )
    assert bundle == app_dir / "model" / MODEL and sorted(os.listdir(bundle / "models")) == ["model.pt"]
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["features"] == TINY["features"] and inference["num_workers"] == 0
    return app_dir, bundle


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method, url, body=None, headers=None, timeout=60):
    """(status, body bytes) of one request; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Server:
    def __init__(self, process, url, log):
        self.process, self.url, self.log = process, url, log

    def log_tail(self, chars=6000):
        with open(self.log, errors="replace") as f:
            return f.read()[-chars:]

    def get_json(self, path, timeout=60):
        status, body = call("GET", self.url + path, timeout=timeout)
        assert status == 200, f"GET {path}: {status} {body[:500]!r}\n{self.log_tail()}"
        return json.loads(body)


@pytest.fixture(scope="module")
def server(app, studies, tmp_path_factory):
    """`python -m monailabel.main start_server` (what the `monailabel` console script runs) on 127.0.0.1:<free port>,
    waited for until /info/ answers; stopped by its PID (and its process group) afterwards."""
    app_dir, _ = app
    folder, _ = studies
    log = tmp_path_factory.mktemp("server") / "server.log"
    port = free_port()
    cmd = [
        ML_PYTHON,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        str(folder),
        "--conf",
        "models",
        MODEL,
        "--conf",
        "zoo_source",
        "github",
        "--conf",
        "sam2",
        "false",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONAI_LABEL_", "PYTHONPATH"))}
    env["TMPDIR"] = str(app_dir.parent)  # the server's logging config, a tmp*.json it leaves when stopped, goes there
    with open(log, "w") as out:
        process = subprocess.Popen(
            cmd, cwd=app_dir.parent, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"server exited with {process.returncode}\n{server.log_tail()}"
            assert time.monotonic() < deadline, f"no /info/ after {START_TIMEOUT} s\n{server.log_tail()}"
            try:
                status, _ = call("GET", server.url + "/info/", timeout=5)
                if status == 200:
                    break
            except (OSError, http.client.HTTPException):  # not listening yet
                pass
            time.sleep(1)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server and its training subprocess, by the server's PID
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def infer_by_id(server, image):
    query = urllib.parse.urlencode({"image": image, "output": "image"})
    body = urllib.parse.urlencode({"params": json.dumps({"device": "cpu"})}).encode()
    status, content = call(
        "POST",
        f"{server.url}/infer/{MODEL}?{query}",
        body,
        {"Content-Type": "application/x-www-form-urlencoded"},
        timeout=INFER_TIMEOUT,
    )
    assert status == 200, f"/infer by id: {status} {content[:500]!r}\n{server.log_tail()}"
    return content


def infer_by_upload(server, path):
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps({"device": "cpu"})}\r\n',
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{os.path.basename(path)}"\r\n'
            "Content-Type: application/gzip\r\n\r\n"
        ),
    ]
    with open(path, "rb") as f:
        body = parts[0].encode() + parts[1].encode() + f.read() + f"\r\n--{boundary}--\r\n".encode()
    status, content = call(
        "POST",
        f"{server.url}/infer/{MODEL}?output=image",
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=INFER_TIMEOUT,
    )
    assert status == 200, f"/infer by upload: {status} {content[:500]!r}\n{server.log_tail()}"
    return content


def as_image(content, folder, name):
    path = folder / name
    path.write_bytes(content)
    return nib.load(path)


def direct_run(bundle, study, out):
    """`run` of the bundle's inference.json on the one study, in this (system) Python: its mask."""
    source = out / "input"
    source.mkdir(parents=True)
    shutil.copy(study, source)
    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        workflow_type="infer",
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        dataset_dir=str(source),
        output_dir=str(out / "runs"),
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return nib.load(out / "runs" / "predictions" / "masks" / os.path.basename(study))


def test_info_lists_the_bundle_and_its_label(server):
    info = server.get_json("/info/")
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {"lesion": 1}  # metadata.json's output channel_def, background left out
    assert MODEL in info["trainers"], "train.json is present, so MONAI Label offers a trainer"
    assert info["labels"] == ["lesion"]


def check_mask(img, study):
    mask = np.asanyarray(img.dataobj)
    assert img.shape == study.shape[:3], (img.shape, study.shape)
    assert np.allclose(img.affine, study.affine, atol=1e-4), (img.affine, study.affine)
    assert set(np.unique(mask)) <= {0, 1}
    return mask.astype(np.uint8)


def test_infer_serves_the_trained_bundle_on_the_studys_grid(server, app, studies, tmp_path):
    _, bundle = app
    folder, lesion = studies
    study = nib.load(folder / f"{TARGET}.nii.gz")
    by_id = check_mask(as_image(infer_by_id(server, TARGET), tmp_path, "by_id.nii.gz"), study)
    # the lesion is found where it is, and little else is (the tiny model trained above is not a good one)
    inside, outside = by_id[lesion].mean(), by_id[~lesion].mean()
    assert inside >= 0.5, f"only {inside:.0%} of the lesion segmented"
    assert outside <= 0.25 and inside >= 4 * outside, f"{inside:.0%} of the lesion vs {outside:.1%} of the rest"
    # exactly what a direct run of the same inference.json (same weights, same pre/post-processing) gives
    direct = check_mask(direct_run(bundle, folder / f"{TARGET}.nii.gz", tmp_path / "direct"), study)
    assert np.array_equal(by_id, direct), f"{(by_id != direct).sum()} voxels differ from the direct run"
    # the same file uploaded (what a client does with a local volume) gives the same mask
    uploaded = check_mask(as_image(infer_by_upload(server, folder / f"{TARGET}.nii.gz"), tmp_path, "up.nii.gz"), study)
    assert np.array_equal(uploaded, by_id)


def test_training_through_monai_label_and_serving_the_result(server, app, studies, tmp_path):
    """BundleTrainTask (POST /train/<model>, run as MONAI Label runs it: a background process) on the studies'
    labels/final: it overrides max_epochs, the train and validation data and the train handlers of train.json."""
    _, bundle = app
    folder, _ = studies
    model_pt = bundle / "models" / "model.pt"
    before = model_pt.stat().st_mtime_ns
    params = {"max_epochs": 2, "val_split": 0.34, "device": "cpu", "multi_gpu": False, "pretrained": True}
    status, body = call(
        "POST", f"{server.url}/train/{MODEL}", json.dumps(params).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, f"/train: {status} {body[:500]!r}\n{server.log_tail()}"
    deadline = time.monotonic() + TRAIN_TIMEOUT
    while True:
        task = server.get_json("/train/")
        if task["status"] in ("DONE", "ERROR", "STOPPED"):
            break
        assert time.monotonic() < deadline, f"training not done after {TRAIN_TIMEOUT} s\n{server.log_tail()}"
        time.sleep(2)
    assert task["status"] == "DONE", f"{task}\n{server.log_tail()}"
    log = server.log_tail(200000)
    assert "Restored all variables from" in log and str(model_pt) in log, "it starts from the served model"
    assert "Epoch[2] Metrics -- val_" in log, "validation ran on the held-out studies"
    assert (bundle / "models" / "checkpoint_epoch=2.pt").is_file()
    assert model_pt.stat().st_mtime_ns != before, "the best validation model replaced models/model.pt"
    # the server notices the new model.pt and serves it: same mask as a direct run with the new weights
    study = nib.load(folder / f"{TARGET}.nii.gz")
    served = check_mask(as_image(infer_by_id(server, TARGET), tmp_path, "after.nii.gz"), study)
    direct = check_mask(direct_run(bundle, folder / f"{TARGET}.nii.gz", tmp_path / "direct"), study)
    assert np.array_equal(served, direct)
