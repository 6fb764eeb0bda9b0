"""A PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS, with dicomweb-client) and Orthanc's REST API beside it (its
change feed, the stable flag of a study): what ``scripts.tools.pacs`` pulls studies with, stores results with and
listens to, and how it keeps identifiers out of its logs.

Credentials come from a file readable by its owner only, or the ``PACS_CREDENTIALS`` environment variable
(``user:password``), never from a URL or a command line, and are never logged. Retrieved studies stay in memory (no
copy of patient data on disk). What is written is named after ``scripts.dicom.series``'s case name, and
``Redactor`` rewrites every log record of the process (ours and the libraries', warnings included) so that no UID,
patient name or ID appears in a log line: a UID becomes ``uid-`` and a hash of it (its study's case name for a
StudyInstanceUID), a patient's name or ID ``[patient]``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import traceback
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from scripts.data.files import InvalidCaseError
from scripts.dicom.uids import case_of, uid_name
from scripts.safe_files import write_atomically

__all__ = [
    "CREDENTIALS_ENV",
    "ListenerState",
    "Pacs",
    "PacsConfigurationError",
    "Redactor",
    "SeriesEntry",
    "StoredOtherObjectError",
    "fingerprint",
    "read_credentials",
]

logger = logging.getLogger(__name__)

CREDENTIALS_ENV = "PACS_CREDENTIALS"
_RESULT_MODALITIES = ("SEG", "SR")
DOWNLOAD_THREADS = 5  # series downloaded at once: one per map
BYTE_ORDER_MARK = b"\xef\xbb\xbf"
CONFIGURATION_STATUSES = {
    401: "the credentials (--credentials_file or $PACS_CREDENTIALS)",
    403: "the user's rights on the PACS",
    404: "the URL (--dicomweb_url, --orthanc_url)",
}


class PacsConfigurationError(ValueError):
    """The PACS refused us (401, 403) or has no such endpoint (404), or cannot be reached at start: a setting to fix,
    not a study to skip."""


class StoredOtherObjectError(ValueError):
    """The PACS holds, under a UID of our results, another object than the one sent (it kept an earlier copy)."""


def read_credentials(credentials_file=None):
    """``(user, password)`` from ``credentials_file`` (one line ``user:password``, readable and writable by its owner
    only, as ssh asks of a key), else from the ``PACS_CREDENTIALS`` environment variable, else ``None`` (no
    authentication).

    Raises:
        ValueError: naming the file (never its content) and the problem: a mode that lets others read or write it,
            a byte-order mark, more than one line, no ``user:``.
    """
    if credentials_file:
        mode = stat.S_IMODE(os.stat(credentials_file).st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(
                f"{credentials_file}: its mode is {mode:04o}, so others may read or change the password; make it"
                f" yours only: chmod 600 {credentials_file}"
            )
        with open(credentials_file, "rb") as f:
            raw = f.read()
        source = credentials_file
        if raw.startswith(BYTE_ORDER_MARK):
            raise ValueError(f"{source}: it starts with a byte-order mark; save it as plain text without one")
        try:
            text = raw.decode()
        except UnicodeDecodeError as err:
            raise ValueError(f"{source}: not UTF-8 text") from err
    elif os.environ.get(CREDENTIALS_ENV):
        text, source = os.environ[CREDENTIALS_ENV], f"${CREDENTIALS_ENV}"
    else:
        return None
    text = text[:-1] if text.endswith("\n") else text
    text = text[:-1] if text.endswith("\r") else text
    if "\n" in text or "\r" in text:
        raise ValueError(f"{source}: it holds more than one line; it must hold one, user:password")
    user, colon, password = text.partition(":")
    if not colon or not user:
        raise ValueError(f"{source}: credentials must be one line user:password")
    return user, password


# a DICOM UID: five or more numeric components, or a 2.25 UUID-derived one (not an IPv4 address, a version, a number)
_UID = re.compile(r"(?<![\d.])(?:[0-2](?:\.\d+){4,}|2\.25\.\d{6,})(?!\.?\d)")


class Redactor:
    """Rewrites text so that it names no study: each DICOM UID becomes ``uid-`` and 12 hex digits of its SHA-256
    (a StudyInstanceUID, its case name ``study-...``), and each registered patient name, name component and ID
    becomes ``[patient]``. UIDs it was told of are replaced however short; others by their form (``_UID``).
    ``install`` applies it to every log record of the process, warnings included."""

    def __init__(self):
        self.uids, self.identifiers = {}, set()
        self._known = None

    def add_uid(self, uid, study=False) -> None:
        """Learn a UID (a study's, named by its case name), e.g. the one ``segment`` is given, before it is read."""
        uid = str(uid).strip()
        if uid and uid not in self.uids:
            self.uids[uid] = case_of(uid) if study else uid_name(uid)
            self._known = None

    def register(self, dataset) -> None:
        """Learn the identifiers of one dataset of a study: its study's and series' UIDs, the patient's name (and
        each name component of 3 characters or more), ID, other IDs and the accession number."""
        if dataset.get("StudyInstanceUID"):
            self.add_uid(dataset.StudyInstanceUID, study=True)
        if dataset.get("SeriesInstanceUID"):
            self.add_uid(dataset.SeriesInstanceUID)
        for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber"):
            values = dataset.get(keyword)
            values = values if isinstance(values, (list, pydicom.multival.MultiValue)) else [values]
            for value in values:
                text = str(value or "").strip()
                if text:
                    self.identifiers.add(text)
                    self.identifiers.update(part.strip() for part in re.split(r"[\^=]", text) if len(part.strip()) >= 3)

    def __call__(self, text) -> str:
        text = str(text)
        for identifier in sorted(self.identifiers, key=len, reverse=True):
            text = text.replace(identifier, "[patient]")
        if self.uids:
            if self._known is None:
                alternatives = "|".join(re.escape(uid) for uid in sorted(self.uids, key=len, reverse=True))
                self._known = re.compile(r"(?<![\d.])(?:" + alternatives + r")(?!\.?\d)")
            text = self._known.sub(lambda m: self.uids[m[0]], text)
        return _UID.sub(lambda m: uid_name(m[0]), text)

    def install(self) -> None:
        """Apply to every log record made from now on in this process (its message, arguments and traceback), and
        route ``warnings.warn`` through logging so that library warnings are rewritten too."""
        make_record = logging.getLogRecordFactory()

        def redacted_record(*args, **kwargs):
            record = make_record(*args, **kwargs)
            try:
                record.msg, record.args = self(record.getMessage()), None
            except Exception:  # a record that cannot be formatted: left to logging's own error report
                return record
            if record.exc_info:
                record.exc_text = self("".join(traceback.format_exception(*record.exc_info)).rstrip())
                record.exc_info = None
            return record

        logging.setLogRecordFactory(redacted_record)
        logging.captureWarnings(True)


def _refuse_userinfo(url):
    if urllib.parse.urlsplit(url).username is not None:
        raise ValueError("the URL holds credentials: give them in a file (--credentials_file) or $" + CREDENTIALS_ENV)
    return url.rstrip("/")


def _configuration_error(err, redact):
    """A ``PacsConfigurationError`` of an HTTP 401, 403 or 404 (status, URL with its UIDs hashed, what to check), or
    ``None`` for another error."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status not in CONFIGURATION_STATUSES:
        return None
    request = getattr(response, "request", None)
    url = redact(getattr(request, "url", "") or getattr(response, "url", ""))
    return PacsConfigurationError(
        f"the PACS answered {status} {response.reason} to {getattr(request, 'method', 'GET')} {url}: check"
        f" {CONFIGURATION_STATUSES[status]}"
    )


class SeriesEntry(NamedTuple):
    """A series as the PACS lists it (QIDO-RS): its UID, description, modality and number of instances."""

    uid: str
    description: str
    modality: str
    instances: int


def _content(dataset) -> str:
    """SHA-256 of a dataset's DICOM JSON without its dates and times: what two copies of one result share."""

    def strip(element):
        if isinstance(element, dict):
            return {
                tag: strip(value)
                for tag, value in element.items()
                if not (isinstance(value, dict) and value.get("vr") in ("DA", "TM", "DT"))
            }
        if isinstance(element, list):
            return [strip(value) for value in element]
        return element

    plain = pydicom.Dataset(dataset)  # the data set alone, without its file meta
    return hashlib.sha256(json.dumps(strip(plain.to_json_dict()), sort_keys=True).encode()).hexdigest()


class Pacs:
    """A DICOMweb server, and the Orthanc REST API beside it for the change feed and the stable flag.

    Args:
        dicomweb_url: the DICOMweb root (Orthanc: ``http://host:8042/dicom-web``).
        credentials: ``read_credentials``'s result.
        orthanc_url: Orthanc's REST root (``http://host:8042``), for ``changes``, ``study_uid`` and ``is_stable``.
        timeout_s: seconds to wait for any one answer.
        redact: the ``Redactor`` of the messages this raises.
    """

    def __init__(self, dicomweb_url, credentials=None, orthanc_url=None, timeout_s=60.0, redact=None):
        self.session = requests.Session()
        if credentials:
            self.session.auth = credentials
        self.dicomweb_url = _refuse_userinfo(dicomweb_url)
        self.client = DICOMwebClient(url=self.dicomweb_url, session=self.session, timeout=timeout_s)
        self.orthanc_url = _refuse_userinfo(orthanc_url) if orthanc_url else None
        self.timeout_s = timeout_s
        self.redact = redact or Redactor()

    def configuration_error(self, err):
        """``err`` as a ``PacsConfigurationError`` where it is one (401, 403, 404), else ``None``."""
        return _configuration_error(err, self.redact)

    def check_connection(self) -> None:
        """Ask the DICOMweb root (and Orthanc's, if given) one question before any work.

        Raises:
            PacsConfigurationError: naming the URL and what to check, for a refusal, a wrong path or no answer.
        """
        checks = [("--dicomweb_url", self.dicomweb_url, lambda: self.client.search_for_studies(limit=1))]
        if self.orthanc_url:
            checks.append(("--orthanc_url", self.orthanc_url, lambda: self._orthanc("/changes", last="")))
        for flag, url, ask in checks:
            try:
                ask()
            except requests.HTTPError as err:
                raise self.configuration_error(err) or PacsConfigurationError(
                    f"{url} answered {err.response.status_code}: check {flag}"
                ) from err
            except (requests.ConnectionError, requests.Timeout) as err:
                raise PacsConfigurationError(f"no answer from {url} ({type(err).__name__}): check {flag}") from err
            except ValueError as err:  # an answer that is not JSON: not a DICOMweb or Orthanc root
                raise PacsConfigurationError(f"{url} did not answer as {flag} should: check it") from err

    def has_study(self, study_uid) -> bool:
        """Whether the PACS holds a study of that StudyInstanceUID (QIDO-RS)."""
        return bool(self.client.search_for_studies(search_filters={"StudyInstanceUID": study_uid}, limit=1))

    def input_series(self, study_uid) -> list:
        """The study's series but SEG and SR (results), as ``SeriesEntry``s, by UID."""
        found = []
        answers = self.client.search_for_series(
            study_instance_uid=study_uid, fields=["NumberOfSeriesRelatedInstances"], get_remaining=True
        )
        for answer in answers:
            series = pydicom.Dataset.from_json(answer)
            modality = str(series.get("Modality", ""))
            self.redact.add_uid(series.SeriesInstanceUID)
            if modality not in _RESULT_MODALITIES:
                count = series.get("NumberOfSeriesRelatedInstances")
                found.append(
                    SeriesEntry(
                        str(series.SeriesInstanceUID),
                        str(series.get("SeriesDescription", "")),
                        modality,
                        int(count) if count not in (None, "") else -1,
                    )
                )
        return sorted(found)

    def retrieve(self, study_uid, series) -> list:
        """The instances of ``series`` (``input_series``'s entries) of the study, as datasets in memory, the series
        retrieved at once (``DOWNLOAD_THREADS``); nothing is written to disk.

        Raises:
            InvalidCaseError: a series whose instances the PACS gives back unreadable, or fewer or more than it
                listed (the study changed while it was read).
        """
        case = case_of(study_uid)

        def retrieve_series(entry):
            try:
                datasets = list(self.client.iter_series(study_uid, entry.uid))
            except requests.RequestException:
                raise
            except Exception as err:  # a part that pydicom cannot read
                raise InvalidCaseError(
                    f'{case}: series "{entry.description}" ({uid_name(entry.uid)}): the PACS gave back an instance that'
                    f" is not readable DICOM ({type(err).__name__}); send the study again whole"
                ) from err
            if entry.instances >= 0 and len(datasets) != entry.instances:
                raise InvalidCaseError(
                    f'{case}: series "{entry.description}" ({uid_name(entry.uid)}) changed while it was read: the PACS'
                    f" listed {entry.instances} instance(s) and gave {len(datasets)}; it is done once it is stable"
                )
            return datasets

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            datasets = [dataset for part in pool.map(retrieve_series, series) for dataset in part]
        for dataset in datasets:
            self.redact.register(dataset)
        return datasets

    def store(self, datasets) -> None:
        """STOW-RS ``datasets`` (all of one study), then read each back (WADO-RS) and compare it with what was sent,
        dates and times aside.

        Raises:
            StoredOtherObjectError: the PACS refused one, or holds another object under its UIDs (a server that keeps
                the first copy of an instance, as Orthanc does with ``OverwriteInstances`` false, and an earlier
                object of those UIDs).
        """
        datasets = list(datasets)
        case = case_of(datasets[0].StudyInstanceUID)
        answer = self.client.store_instances(datasets)
        failed = len(answer.get("FailedSOPSequence") or [])
        for dataset in datasets:
            try:
                held = self.client.retrieve_instance(
                    str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)
                )
            except requests.HTTPError as err:
                if err.response is None or err.response.status_code != 404:
                    raise
                raise StoredOtherObjectError(
                    f'{case}: the PACS did not store the "{dataset.SeriesDescription}" sent ({failed} of'
                    f" {len(datasets)} objects refused); nothing of this run is recorded as stored"
                ) from err
            if _content(held) != _content(dataset):
                raise StoredOtherObjectError(
                    f'{case}: the PACS holds another object under the UIDs of the "{dataset.SeriesDescription}" sent'
                    f" ({uid_name(dataset.SOPInstanceUID)}) and kept it (a server that keeps the first copy of an"
                    " instance: Orthanc's OverwriteInstances false); what it holds is not this run's result. Delete"
                    " that object from the PACS and run again, or set OverwriteInstances true"
                )

    def _orthanc(self, path, method="GET", data=None, **params):
        if not self.orthanc_url:
            raise ValueError("this needs Orthanc's REST URL (--orthanc_url)")
        answer = self.session.request(
            method, self.orthanc_url + path, params=params or None, data=data, timeout=self.timeout_s
        )
        answer.raise_for_status()
        return answer.json()

    def changes(self, since) -> dict:
        """Orthanc's change feed after sequence number ``since``: ``{"Changes": [...], "Done": bool, "Last": n}``."""
        return self._orthanc("/changes", since=since, limit=100)

    def last_change(self) -> int:
        """The sequence number of Orthanc's last change: where a listener that starts now begins."""
        return int(self._orthanc("/changes", last="")["Last"])

    def study_uid(self, orthanc_id) -> str | None:
        """The StudyInstanceUID of Orthanc's study ``orthanc_id`` (``None`` if it was deleted meanwhile)."""
        try:
            return self._orthanc(f"/studies/{orthanc_id}")["MainDicomTags"]["StudyInstanceUID"]
        except requests.HTTPError as err:
            if err.response is not None and err.response.status_code == 404:
                return None
            raise

    def orthanc_id(self, study_uid) -> str | None:
        """Orthanc's ID of the study of that StudyInstanceUID, or ``None``."""
        found = self._orthanc("/tools/lookup", method="POST", data=study_uid)
        return next((item["ID"] for item in found if item.get("Type") == "Study"), None)

    def is_stable(self, study_uid) -> bool | None:
        """Whether Orthanc calls the study stable (no instance arrived within its ``StableAge``); ``None`` without
        ``orthanc_url`` (a plain DICOMweb server has no such flag) or for a study it does not hold."""
        if not self.orthanc_url:
            return None
        orthanc_id = self.orthanc_id(study_uid)
        return None if orthanc_id is None else bool(self._orthanc(f"/studies/{orthanc_id}").get("IsStable", True))

    def all_stable(self) -> bool:
        """Whether every study Orthanc holds is stable (nothing arrived within its ``StableAge``)."""
        return all(study.get("IsStable", True) for study in self._orthanc("/studies", expand=""))


def fingerprint(series, settings) -> str:
    """What a study's segmentation depends on before it is read: its input series and their instance counts
    (``Pacs.input_series``), and the settings (a digest of the configs) it is read and checked under."""
    return hashlib.sha256(json.dumps([[list(entry) for entry in series], settings]).encode()).hexdigest()


class ListenerState:
    """What the listener has done, in one JSON file written whole after every study it handles and after each page of
    the change feed (the instances arriving, one change each, are not worth a disk flush apiece): the change feed's
    position (``since``) and, per study (by case name), the fingerprint of the inputs it segmented or refused, the
    digest of the settings it did so under, its Orthanc ID and the outcome. A restart continues after the last
    change saved; a study it was killed in the middle of is done again (its results have the same UIDs, so the PACS
    holds them once).

    Args:
        path: the state file.
    """

    def __init__(self, path):
        self.path = path
        self.since, self.studies = 0, {}
        self.exists = os.path.isfile(path)
        if self.exists:
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

    def record(self, case, inputs, outcome, orthanc_id=None, settings=None) -> None:
        """Keep how ``case`` with ``inputs`` ended: ``"stored"`` or the one-line reason it was not."""
        self.studies[case] = {
            "inputs": inputs,
            "outcome": re.sub(r"\s+", " ", outcome)[:500],
            "orthanc_id": orthanc_id,
            "settings": settings,
        }

    def to_redo(self, settings) -> list:
        """The Orthanc IDs of the studies not stored (refused or failed) under other settings than ``settings``."""
        return [
            study["orthanc_id"]
            for study in self.studies.values()
            if study.get("outcome") != "stored" and study.get("orthanc_id") and study.get("settings") != settings
        ]
