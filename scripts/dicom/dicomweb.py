"""A PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS, with dicomweb-client) and Orthanc's change feed: what
``scripts.tools.pacs`` pulls studies with, stores results with and listens to.

Credentials come from a file or the ``PACS_CREDENTIALS`` environment variable (``user:password``), never from a URL
or a command line, and are never logged. Retrieved studies stay in memory (no copy of patient data on disk); what is
written is named after ``scripts.dicom.series``'s case name: no patient name or ID reaches a file name or a log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from scripts.safe_files import write_atomically

__all__ = ["CREDENTIALS_ENV", "ListenerState", "Pacs", "read_credentials"]

logger = logging.getLogger(__name__)

CREDENTIALS_ENV = "PACS_CREDENTIALS"
# DICOM JSON tags of a QIDO-RS series result
_SERIES_UID, _DESCRIPTION, _MODALITY = "0020000E", "0008103E", "00080060"
_RESULT_MODALITIES = ("SEG", "SR")
DOWNLOAD_THREADS = 5  # series downloaded at once: one per map


def read_credentials(credentials_file=None):
    """``(user, password)`` from ``credentials_file`` (one line ``user:password``), else from the ``PACS_CREDENTIALS``
    environment variable, else ``None`` (no authentication)."""
    if credentials_file:
        with open(credentials_file) as f:
            text = f.read().strip()
        source = credentials_file
    elif os.environ.get(CREDENTIALS_ENV):
        text, source = os.environ[CREDENTIALS_ENV].strip(), f"${CREDENTIALS_ENV}"
    else:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user:
        raise ValueError(f"{source}: credentials must be one line user:password")
    return user, password


def _refuse_userinfo(url):
    if urllib.parse.urlsplit(url).username is not None:
        raise ValueError("the URL holds credentials: give them in a file (--credentials_file) or $" + CREDENTIALS_ENV)
    return url.rstrip("/")


def _value(element, tag, default=""):
    values = element.get(tag, {}).get("Value", [])
    return values[0] if values else default


class Pacs:
    """A DICOMweb server, and the Orthanc REST API beside it for the change feed.

    Args:
        dicomweb_url: the DICOMweb root (Orthanc: ``http://host:8042/dicom-web``).
        credentials: ``read_credentials``'s result.
        orthanc_url: Orthanc's REST root (``http://host:8042``), for ``changes`` and ``study_uid``.
        timeout_s: seconds to wait for any one answer.
    """

    def __init__(self, dicomweb_url, credentials=None, orthanc_url=None, timeout_s=60.0):
        self.session = requests.Session()
        if credentials:
            self.session.auth = credentials
        self.client = DICOMwebClient(url=_refuse_userinfo(dicomweb_url), session=self.session, timeout=timeout_s)
        self.orthanc_url = _refuse_userinfo(orthanc_url) if orthanc_url else None
        self.timeout_s = timeout_s

    def input_series(self, study_uid) -> list:
        """The study's series but SEG and SR (results), as (series UID, description, modality), by UID."""
        found = []
        for element in self.client.search_for_series(study_instance_uid=study_uid, get_remaining=True):
            modality = _value(element, _MODALITY)
            if modality not in _RESULT_MODALITIES:
                found.append((_value(element, _SERIES_UID), str(_value(element, _DESCRIPTION)), modality))
        return sorted(found)

    def retrieve(self, study_uid, series) -> list:
        """The instances of ``series`` (``input_series``'s entries) of the study, as datasets in memory, the series
        retrieved at once (``DOWNLOAD_THREADS``); nothing is written to disk."""

        def retrieve_series(series_uid):
            return list(self.client.iter_series(study_uid, series_uid))

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            return [dataset for part in pool.map(retrieve_series, [uid for uid, _, _ in series]) for dataset in part]

    def store(self, paths) -> None:
        """STOW-RS the DICOM files ``paths`` (a rerun's objects, of the same UIDs, replace the earlier ones where
        the server overwrites instances, as Orthanc does with ``OverwriteInstances``)."""
        self.client.store_instances([pydicom.dcmread(path) for path in paths])

    def _orthanc(self, path, **params):
        if not self.orthanc_url:
            raise ValueError("listening needs Orthanc's REST URL (--orthanc_url)")
        answer = self.session.get(self.orthanc_url + path, params=params, timeout=self.timeout_s)
        answer.raise_for_status()
        return answer.json()

    def changes(self, since) -> dict:
        """Orthanc's change feed after sequence number ``since``: ``{"Changes": [...], "Done": bool, "Last": n}``."""
        return self._orthanc("/changes", since=since, limit=100)

    def study_uid(self, orthanc_id) -> str | None:
        """The StudyInstanceUID of Orthanc's study ``orthanc_id`` (``None`` if it was deleted meanwhile)."""
        try:
            return self._orthanc(f"/studies/{orthanc_id}")["MainDicomTags"]["StudyInstanceUID"]
        except requests.HTTPError as err:
            if err.response is not None and err.response.status_code == 404:
                return None
            raise

    def all_stable(self) -> bool:
        """Whether every study Orthanc holds is stable (nothing arrived within its ``StableAge``)."""
        return all(study.get("IsStable", True) for study in self._orthanc("/studies", expand=""))


def fingerprint(series) -> str:
    """What a study's segmentation depends on: its input series (``Pacs.input_series``)."""
    return hashlib.sha256(json.dumps(series).encode()).hexdigest()


class ListenerState:
    """What the listener has done, in one JSON file written whole after every study it handles and after each page of
    the change feed (the instances arriving, one change each, are not worth a disk flush apiece): the change feed's
    position (``since``) and, per study (by case name), the fingerprint of the inputs it segmented or refused. A
    restart continues after the last change saved; a study it was killed in the middle of is done again (its
    results have the same UIDs, so the PACS holds them once).

    Args:
        path: the state file.
    """

    def __init__(self, path):
        self.path = path
        self.since, self.studies = 0, {}
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    state = json.load(f)
                self.since, self.studies = int(state["since"]), dict(state["studies"])
            except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
                raise ValueError(f"{path}: not a listener state file ({err!r}); move it away to start afresh") from err

    def save(self) -> None:
        """Write the state whole (temporary name, then rename)."""
        text = json.dumps({"since": self.since, "studies": self.studies}, indent=1, sort_keys=True)
        write_atomically(self.path, lambda f: f.write(text.encode()))

    def is_done(self, case, inputs) -> bool:
        """Whether ``case`` was handled with these inputs (``fingerprint``)."""
        return self.studies.get(case, {}).get("inputs") == inputs

    def record(self, case, inputs, outcome) -> None:
        """Keep how ``case`` with ``inputs`` ended: ``"stored"`` or the one-line error that refused it."""
        self.studies[case] = {"inputs": inputs, "outcome": re.sub(r"\s+", " ", outcome)[:500]}
