"""A real Orthanc PACS for the tests (Debian's ``orthanc`` and ``orthanc-dicomweb`` packages, which `.ci/run`
installs): ``start_orthanc(folder)`` runs ``/usr/sbin/Orthanc`` on free ports with its storage, index, config and log
in ``folder``, DICOMweb at ``/dicom-web/`` and HTTP basic authentication for one user with a random password.

    ok, reason = orthanc_available()
    if not ok:
        pytest.skip(reason)
    with start_orthanc(tmp_path) as orthanc:
        upload(orthanc, [path])
        instances_of_study(orthanc, study_uid)

Orthanc 1.10 listens on all interfaces (it has no setting for the address): ``RemoteAccessAllowed`` false makes its
HTTP server refuse every client but this machine, and its DICOM port is meant for this machine too.
"""

import atexit
import json
import os
import secrets
import socket
import subprocess
import time

import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
START_TIMEOUT = 30
USERNAME = "tests"


def orthanc_available():
    """Whether ``start_orthanc`` can run here.

    Returns:
        ``(True, "")``, or ``(False, reason)`` naming what is missing, for ``pytest.skip(reason)``.
    """
    install = "install Debian's orthanc and orthanc-dicomweb packages (.ci/run does where it can)"
    if not os.access(ORTHANC, os.X_OK):
        return False, f"no Orthanc at {ORTHANC}: {install}"
    if not os.path.isfile(DICOMWEB_PLUGIN):
        return False, f"no Orthanc DICOMweb plugin at {DICOMWEB_PLUGIN}: {install}"
    return True, ""


def free_port():
    """A TCP port of 127.0.0.1 that is free now (the OS's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """A running Orthanc server, from ``start_orthanc``; a context manager that stops it on exit.

    Attributes:
        url: its REST API, ``http://127.0.0.1:PORT``.
        dicomweb_url: ``url + "/dicom-web"``, the DICOMweb root (QIDO-RS, WADO-RS, STOW-RS).
        dicom_port: its DICOM (DIMSE) port, AE title ``ORTHANC``.
        username: the one registered user.
        password: that user's password (random).
        credentials_file: a file (mode 0600) holding ``username:password`` on one line.
        folder: the folder of its config, storage, index and log.
        config_path: its JSON config.
        log_path: its stdout and stderr.
        process: its ``subprocess.Popen``.
    """

    def __init__(self, folder, http_port, dicom_port, password, process):
        self.folder = str(folder)
        self.url = f"http://127.0.0.1:{http_port}"
        self.dicomweb_url = self.url + "/dicom-web"
        self.dicom_port = dicom_port
        self.username, self.password = USERNAME, password
        self.credentials_file = os.path.join(self.folder, "credentials")
        self.config_path = os.path.join(self.folder, "orthanc.json")
        self.log_path = os.path.join(self.folder, "orthanc.log")
        self.process = process

    @property
    def auth(self):
        """``(username, password)``, the ``auth`` argument of ``requests``."""
        return self.username, self.password

    def request(self, method, path, **kwargs):
        """``requests.request`` of ``url + path`` with the credentials; a response of any status is returned."""
        kwargs.setdefault("timeout", 60)
        return requests.request(method, self.url + path, auth=self.auth, **kwargs)

    def get_json(self, path, **kwargs):
        """The JSON answer of ``GET url + path``; raises ``requests.HTTPError`` unless its status is 2xx."""
        response = self.request("GET", path, **kwargs)
        response.raise_for_status()
        return response.json()

    def log_tail(self, chars=4000):
        """The last ``chars`` characters of Orthanc's log."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-chars:]
        except OSError as err:
            return f"(no log: {err})"

    def stop(self, timeout=15):
        """Ends Orthanc: SIGTERM (it shuts down cleanly), then SIGKILL after ``timeout`` seconds.

        Returns:
            Its exit status.
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def write_config(folder, http_port, dicom_port, password, overwrite_instances=True, stable_age=1):
    """The config of a test server: everything in ``folder``, quick to mark studies stable (``stable_age`` seconds),
    no jobs kept; a re-sent instance replaces the stored one (``overwrite_instances``) or is ignored (Orthanc's
    default)."""
    config = {
        "Name": "tests",
        "StorageDirectory": os.path.join(folder, "storage"),
        "IndexDirectory": os.path.join(folder, "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USERNAME: password},
        # a study, series or patient is "stable" (a StableStudy change in /changes) 1 s after its last new instance
        "StableAge": int(stable_age),
        # a re-sent instance (same SOPInstanceUID) replaces the stored one, or is ignored (False, Orthanc's default)
        "OverwriteInstances": bool(overwrite_instances),
        "ConcurrentJobs": 1,
        "SaveJobs": False,
        "HttpThreadsCount": 10,
        "HttpDescribeErrors": True,
        "WebDavEnabled": False,
        "MetricsEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        # "Host": the RetrieveURLs of QIDO-RS and STOW-RS answers are built from the request's Host header, and
        # dicomweb-client sends its host without the port
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": f"127.0.0.1:{http_port}"},
    }
    path = os.path.join(folder, "orthanc.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    return path


def write_credentials(path, username, password):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{username}:{password}\n")
    os.chmod(path, 0o600)  # also when the file was there already


def wait_until_up(orthanc, deadline):
    """True once ``GET /system`` answers 200, False if Orthanc exited first; raises ``RuntimeError`` at ``deadline``."""
    while True:
        if orthanc.process.poll() is not None:
            return False
        try:
            if orthanc.request("GET", "/system", timeout=5).status_code == 200:
                return True
        except requests.RequestException:  # not listening yet
            pass
        if time.monotonic() > deadline:
            orthanc.stop()
            raise RuntimeError(f"Orthanc did not answer GET /system in time\n{orthanc.log_tail()}")
        time.sleep(0.2)


def start_orthanc(folder, timeout=START_TIMEOUT, overwrite_instances=True, stable_age=1):
    """Starts Orthanc with its config, storage, index, credentials and log in ``folder``.

    Args:
        folder: the folder for the server's files (made if missing).
        timeout: seconds to wait for ``GET /system`` to answer.
        overwrite_instances: Orthanc's ``OverwriteInstances``: a re-sent instance replaces the stored one (True), or
            the first copy is kept (False, Orthanc's default).
        stable_age: Orthanc's ``StableAge``: seconds after a study's last instance until it is stable.

    Returns:
        The running ``Orthanc`` (a context manager; else call its ``stop()``).

    Raises:
        RuntimeError: Orthanc exited or did not answer in ``timeout`` seconds (the message ends with its log).
    """
    folder = os.path.abspath(str(folder))
    os.makedirs(folder, exist_ok=True)
    password = secrets.token_urlsafe(16)
    deadline = time.monotonic() + timeout
    for _ in range(3):  # another process may take a free port before Orthanc binds it: then new ports
        http_port, dicom_port = free_port(), free_port()
        while dicom_port == http_port:
            dicom_port = free_port()
        config = write_config(folder, http_port, dicom_port, password, overwrite_instances, stable_age)
        with open(os.path.join(folder, "orthanc.log"), "w") as log:
            process = subprocess.Popen(
                [ORTHANC, config], cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        orthanc = Orthanc(folder, http_port, dicom_port, password, process)
        if wait_until_up(orthanc, deadline):
            write_credentials(orthanc.credentials_file, orthanc.username, password)
            atexit.register(orthanc.stop)  # not left running when a test run ends without stopping it
            return orthanc
        if "already in use" not in orthanc.log_tail():
            break
    raise RuntimeError(f"Orthanc exited with status {process.returncode}\n{orthanc.log_tail()}")


def upload(orthanc, paths):
    """POSTs each DICOM file to ``/instances``.

    Returns:
        Orthanc's answers, one per file: ``{"ID", "ParentStudy", "ParentSeries", "Status", ...}``.

    Raises:
        requests.HTTPError: a file was refused (not DICOM, say).
    """
    answers = []
    for path in paths:
        with open(path, "rb") as f:
            response = orthanc.request(
                "POST", "/instances", data=f.read(), headers={"Content-Type": "application/dicom"}
            )
        if not response.ok:
            raise requests.HTTPError(f"POST /instances of {path}: {response.status_code} {response.text[:500]}")
        answers.append(response.json())
    return answers


def delete_instance(orthanc, sop_instance_uid):
    """Deletes the instance of that SOPInstanceUID from Orthanc (its REST API: DICOMweb has no delete)."""
    found = orthanc.request("POST", "/tools/lookup", data=sop_instance_uid)
    found.raise_for_status()
    for item in (x for x in found.json() if x["Type"] == "Instance"):
        orthanc.request("DELETE", f"/instances/{item['ID']}").raise_for_status()


def instances_of_study(orthanc, study_instance_uid):
    """The instances Orthanc holds of one study.

    Returns:
        ``[{"SOPInstanceUID", "SeriesInstanceUID", "Modality"}, ...]`` sorted by series then SOP instance UID; empty
        when Orthanc has no such study.
    """
    found = orthanc.request("POST", "/tools/lookup", data=study_instance_uid)
    found.raise_for_status()
    instances = []
    for study in (x for x in found.json() if x["Type"] == "Study"):
        for series in orthanc.get_json(f"/studies/{study['ID']}/series"):
            tags = series["MainDicomTags"]
            for instance in orthanc.get_json(f"/series/{series['ID']}/instances"):
                instances.append(
                    {
                        "SOPInstanceUID": instance["MainDicomTags"]["SOPInstanceUID"],
                        "SeriesInstanceUID": tags["SeriesInstanceUID"],
                        "Modality": tags.get("Modality", ""),
                    }
                )
    return sorted(instances, key=lambda x: (x["SeriesInstanceUID"], x["SOPInstanceUID"]))
