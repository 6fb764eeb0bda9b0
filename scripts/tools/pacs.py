"""Segment CT perfusion studies from a PACS and store the results back in it, over DICOMweb: one study
(``segment``), or each study as it becomes stable in Orthanc (``listen``, its ``/changes`` feed). See docs/dicom.md.

    # one study: pull its series (QIDO-RS, WADO-RS), segment it (configs/inference.json + configs/dicom.json),
    # store the DICOM SEG and SR back (STOW-RS) and read them back
    python -m scripts.tools.pacs segment --dicomweb_url http://pacs:8042/dicom-web --study_uid 1.2.3... \\
        --output_dir OUT [--orthanc_url http://pacs:8042] [--bundle_root .] [--credentials_file FILE] \\
        [--config_file my_settings.json]
    # every study that becomes stable from now on, until stopped (or, with --until_idle true, until nothing is left)
    python -m scripts.tools.pacs listen --dicomweb_url http://pacs:8042/dicom-web --orthanc_url http://pacs:8042 \\
        --output_dir OUT [--bundle_root .] [--credentials_file FILE] [--poll_s 2] [--backfill_from beginning|DATE]

Credentials: ``--credentials_file`` (one line ``user:password``, mode 600) or ``$PACS_CREDENTIALS``, never on the
command line. The PACS is asked one question first: a refusal (401, 403), a wrong path (404) or no answer stops the
command with one line naming the URL and what to check. Only complete studies are segmented: ``segment`` refuses a
study that Orthanc (with ``--orthanc_url``) has not marked stable, and the series checks refuse gaps, slices still
missing and maps reaching beyond the NCCT (``scripts.dicom.series``). Only the series that ``series_rules`` may pick
are retrieved, into memory (no copy on disk); each study's run writes ``OUT/results/<case>/predictions/`` (mask,
overlay, volumes.csv, ``dicom/<case>/seg.dcm`` and ``sr.dcm``); the SEG and SR are stored, read back and compared
with what was sent, and then ``OUT/results/<case>/stored.json`` records it: ``segment`` refuses the study again
without ``--overwrite true``; a run stopped before that is done again by the same command. A study refused by the
checks sends nothing.

The listener starts at the end of Orthanc's change feed (``--backfill_from beginning`` or a date works through the
studies that became stable before) and keeps its place in ``OUT/listener.json``: after a restart (even after kill -9)
it continues with the change it was in. It records each study's outcome with a fingerprint of its input series, their
instance counts and the settings: a study whose fingerprint has not changed (e.g. its StableStudy event after our own
SEG and SR arrived) is not done again; one that changed is. A study that fails, for any reason, is recorded with the
reason and the listener goes on; a refused or failed study is done again when it changes, or at a restart under
other settings (e.g. ``series_rules`` fixed as its refusal said). No UID, patient name or ID reaches a log line.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time

import pydicom
import requests
from scripts import BUNDLE_ROOT
from scripts.data.channels import matches_description
from scripts.data.files import InvalidCaseError
from scripts.dicom.dicomweb import ListenerState, Pacs, Redactor, fingerprint, read_credentials
from scripts.dicom.uids import case_of
from scripts.flags import as_bool
from scripts.safe_files import write_atomically
from scripts.tools.cli import run

logger = logging.getLogger(__name__)

CONFIGS = ("inference.json", "dicom.json")
STATE_FILE = "listener.json"
STORED = "stored.json"  # in a study's results folder once its SEG and SR are in the PACS
COMMANDS = ("segment", "listen")
RETRY = (
    "It is done again when its instances change, or when the listener restarts under other settings (site_series_rules"
    " fixed, say); to try it now, run `segment` on it"
)


def config_files(config_file) -> list:
    """inference.json, dicom.json and the comma-separated ``config_file``s after them (each must exist)."""
    extra = [path for path in (config_file or "").split(",") if path]
    missing = [path for path in extra if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"--config_file {missing[0]}: no such file")
    return [os.path.join(BUNDLE_ROOT, "configs", name) for name in CONFIGS] + extra


class StudySegmenter:
    """Pulls one study, segments it with the bundle's DICOM profile and stores its SEG and SR.

    Args:
        pacs: the ``scripts.dicom.dicomweb.Pacs``.
        output_dir: where the results (``results/<case>/``) go.
        bundle_root: the bundle root (its ``models/model.pt``).
        config_files: inference.json, dicom.json and the user's own configs, in order.
    """

    def __init__(self, pacs, output_dir, bundle_root, config_files):
        # imported here, not at the top: flags, credentials and the PACS's first answer are checked before the
        # seconds MONAI and torch take to import
        from monai.bundle import ConfigParser

        self.pacs, self.output_dir, self.bundle_root, self.config_files = pacs, output_dir, bundle_root, config_files
        parser = ConfigParser()
        parser.read_config(config_files)
        self.rules = parser.get_parsed_content("series_rules")
        self.channels = parser.get_parsed_content("channels")
        # what a study's handling depends on besides its series: the configs, as read
        self.settings = hashlib.sha256(json.dumps(parser.get(), sort_keys=True, default=repr).encode()).hexdigest()

    def inputs(self, study_uid) -> list:
        """The study's series that a channel's rule may pick (by modality and description, as the PACS lists them);
        not a raw perfusion series: a study segmented from the PACS uses its vendor maps."""
        return [
            series
            for series in self.pacs.input_series(study_uid)
            if any(matches_description(self.rules[c], series.modality, series.description) for c in self.channels)
        ]

    def __call__(self, study_uid, series, overwrite) -> list:
        """Segment the study from its ``series`` (``inputs``'s) and store the results; returns the stored files."""
        from monai.bundle import ConfigWorkflow
        from scripts.dicom.series import studies_in_memory
        from scripts.monai_gaps import config_root_notice_dropped

        case = case_of(study_uid)
        unmatched = [
            channel
            for channel in self.channels
            if not any(matches_description(self.rules[channel], s.modality, s.description) for s in series)
        ]
        if unmatched:  # known from the PACS's listing: nothing is retrieved
            listed = "; ".join(f'"{s.description}" ({s.modality})' for s in self.pacs.input_series(study_uid))
            raise InvalidCaseError(
                f"{case}: no series for {', '.join(unmatched)} in the PACS's listing of the study (its series:"
                f" {listed or 'none'}). If one of them is it, set site_series_rules for your site's names in a config file"
                " of yours (--config_file, docs/dicom.md)"
            )
        results = os.path.join(self.output_dir, "results", case)
        stored = os.path.join(results, STORED)
        if os.path.isfile(stored) and not as_bool(overwrite, "overwrite"):
            raise FileExistsError(
                f"{results}: this study's SEG and SR were stored in the PACS ({stored}); pass --overwrite true to"
                " segment and store it again"
            )
        if os.path.isfile(stored):  # --overwrite true: it says so again only once this run's results are stored
            os.remove(stored)
        studies = studies_in_memory(self.pacs.retrieve(study_uid, series), self.rules, self.channels)
        with config_root_notice_dropped():  # a site's config lies outside configs/
            workflow = ConfigWorkflow(
                config_file=self.config_files,
                meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
                logging_file=os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
                workflow_type="infer",
                bundle_root=self.bundle_root,
                dataset_dir=self.output_dir,
                studies=studies,
                output_dir=results,
                overwrite=True,  # this study's own folder: a run stopped before its results were stored is done again
            )
        try:
            workflow.initialize()
            workflow.run()
        except RuntimeError as err:  # MONAI's "Failed to evaluate ...": the refusal inside it is the message
            raise _refusal(err) from err
        finally:
            workflow.finalize()
        writer = workflow.parser.get_parsed_content("case_writers")[0]
        files = list(writer.files(case))
        self.pacs.store([pydicom.dcmread(path) for path in files])
        record = json.dumps({"stored": [os.path.relpath(path, results) for path in files]})
        write_atomically(stored, lambda f: f.write(record.encode()))
        logger.info("%s: stored its SEG and SR; the PACS holds what was sent", case)
        return files


def _refusal(err):
    """The innermost ``ValueError``/``OSError`` (a refused study or folder) that MONAI's ``RuntimeError`` wraps, else
    the innermost error."""
    cause, found = err, None
    while cause is not None:
        if isinstance(cause, (ValueError, OSError)):
            found = cause
        innermost, cause = cause, cause.__cause__
    return found or innermost


def segment(segmenter, study_uid, overwrite) -> None:
    """Segment one study of the PACS and store its results, once it is whole.

    Raises:
        InvalidCaseError: the PACS has no such study, or Orthanc has not marked it stable (still arriving).
    """
    pacs, case = segmenter.pacs, case_of(study_uid)
    if not pacs.has_study(study_uid):
        raise InvalidCaseError(f"{case}: the PACS ({pacs.dicomweb_url}) has no study of that StudyInstanceUID")
    if pacs.is_stable(study_uid) is False:
        raise InvalidCaseError(
            f"{case}: the study is still arriving (Orthanc has not marked it stable: an instance came within its"
            " StableAge); nothing was read or sent. Run again once it is stable, or let the listener do it"
        )
    segmenter(study_uid, segmenter.inputs(study_uid), overwrite)


def listen(segmenter, state, poll_s, until_idle, not_before=None) -> None:
    """Follow Orthanc's change feed from ``state.since``, segmenting each stable study whose inputs are new; first
    the refused or failed studies of ``state`` that were handled under other settings.

    Args:
        segmenter: the ``StudySegmenter``.
        state: the ``scripts.dicom.dicomweb.ListenerState``.
        poll_s: seconds between polls of an exhausted feed, or after the PACS did not answer.
        until_idle: return once the feed is exhausted and every study is stable, instead of polling on.
        not_before: skip the StableStudy changes dated before this (Orthanc's ``YYYYMMDDTHHMMSS``).

    Raises:
        PacsConfigurationError: the PACS refused us (401, 403) or the feed is not where ``--orthanc_url`` says
            (404): a setting to fix, so the listener stops at once.
    """
    pacs = segmenter.pacs
    for orthanc_id in state.to_redo(segmenter.settings):
        _guard(pacs, lambda orthanc_id=orthanc_id: _handle_study(segmenter, state, orthanc_id))
        state.save()
    while True:
        feed = {"Done": True}
        try:
            feed = pacs.changes(state.since)
            for change in feed["Changes"]:
                study = change["ChangeType"] == "StableStudy" and (not_before is None or change["Date"] >= not_before)
                if study:
                    _handle_study(segmenter, state, change["ID"])
                state.since = int(change["Seq"])
                if study:
                    state.save()  # a study's outcome is kept the moment it is known
            if feed["Changes"]:
                state.save()  # the page's other changes (instances arriving): after a kill, at most a page re-read
            if feed["Done"] and until_idle and pacs.all_stable() and not pacs.changes(state.since)["Changes"]:
                return
        except requests.RequestException as err:
            _guard_error(pacs, err, poll_s)
            feed = {"Done": True}
        if feed["Done"]:
            time.sleep(poll_s)


def _guard(pacs, handle):
    try:
        handle()
    except requests.RequestException as err:
        _guard_error(pacs, err, 0)


def _guard_error(pacs, err, poll_s):
    """Stop on a configuration error (401, 403, 404); else log the PACS's silence (it restarts, the network is down),
    to be tried again."""
    configuration = pacs.configuration_error(err)
    if configuration is not None:
        raise configuration from err
    status = getattr(getattr(err, "response", None), "status_code", None)
    url = getattr(getattr(err, "request", None), "url", None) or pacs.orthanc_url or pacs.dicomweb_url
    logger.warning(
        "the PACS did not answer %s (%s%s); trying again in %s s",
        pacs.redact(url),
        type(err).__name__,
        f" {status}" if status else "",
        poll_s,
    )


def _handle_study(segmenter, state, orthanc_id):
    """Segment and store one study that Orthanc calls stable, unless its fingerprint is the one recorded; record the
    outcome whatever happens to it (a failure of one study never stops the listener)."""
    pacs = segmenter.pacs
    study_uid = pacs.study_uid(orthanc_id)
    if study_uid is None:  # deleted meanwhile
        return
    pacs.redact.add_uid(study_uid, study=True)
    case, inputs = case_of(study_uid), None
    try:
        series = segmenter.inputs(study_uid)
        inputs = fingerprint(series, segmenter.settings)
        if state.is_done(case, inputs):
            logger.info("%s: already handled with these series and settings", case)
            return
        if pacs.is_stable(study_uid) is False:
            logger.info("%s: still arriving; it is done once Orthanc marks it stable", case)
            return
        segmenter(study_uid, series, overwrite=True)  # the listener's own folder: a study done again is replaced
        outcome = "stored"
    except (requests.ConnectionError, requests.Timeout):  # the PACS, not the study: the change is handled again
        raise
    except requests.HTTPError as err:
        if pacs.configuration_error(err) is not None and err.response.status_code in (401, 403):
            raise
        outcome = _failed(case, err)
    except (ValueError, OSError) as err:  # refused by the checks, or not stored as sent
        logger.error("%s: not segmented or not stored: %s. %s", case, err, RETRY)
        outcome = f"refused: {err}"
    except Exception as err:  # noqa: BLE001 (any other failure is recorded, and the listener goes on)
        outcome = _failed(case, err)
    state.record(case, inputs, pacs.redact(outcome), orthanc_id, segmenter.settings)


def _failed(case, err):
    logger.error("%s: failed, not stored (%s: %s). %s", case, type(err).__name__, err, RETRY, exc_info=err)
    return f"failed: {type(err).__name__}: {err}"


def _not_before(backfill_from):
    """Orthanc's change date (``YYYYMMDDTHHMMSS``) of ``--backfill_from``'s date, ``None`` for ``beginning``."""
    if backfill_from == "beginning":
        return None
    try:
        day = datetime.date.fromisoformat(backfill_from)
    except ValueError as err:
        raise ValueError(f"--backfill_from must be 'beginning' or a date YYYY-MM-DD, got {backfill_from!r}") from err
    return day.strftime("%Y%m%dT000000")


def start_listening(segmenter, state, poll_s, until_idle, backfill_from=None) -> None:
    """``listen`` from where it should start: after the last change ``state`` saw; for a new state, at the end of
    the feed (nothing that was stable before is segmented), or, with ``backfill_from``, from the feed's beginning
    (``beginning``) or from the stable studies of a date on."""
    not_before = None
    if backfill_from is not None:
        not_before = _not_before(str(backfill_from))
        state.since = 0
        state.save()  # killed before its first page, a restart still starts from the beginning
    elif not state.exists:
        state.since = segmenter.pacs.last_change()
        state.save()
        logger.info(
            "listening from the end of Orthanc's change feed (change %d): the studies already there are not"
            " segmented (--backfill_from beginning or a date does them)",
            state.since,
        )
    listen(segmenter, state, poll_s, until_idle, not_before)


def main(
    command: str,
    dicomweb_url: str,
    output_dir: str,
    study_uid: str | None = None,
    orthanc_url: str | None = None,
    bundle_root: str = ".",
    config_file: str | None = None,
    credentials_file: str | None = None,
    poll_s: float = 2.0,
    until_idle: bool = False,
    overwrite: bool = False,
    backfill_from: str | None = None,
):
    """Segment one study of a PACS (``segment``) or each study that becomes stable in an Orthanc (``listen``).

    Args:
        command: ``segment`` or ``listen``.
        dicomweb_url: the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``.
        output_dir: the folder for results and the listener's state.
        study_uid: the StudyInstanceUID to segment (``segment``).
        orthanc_url: Orthanc's REST root, e.g. ``http://pacs:8042`` (``listen``; ``segment`` checks with it that the
            study is stable).
        bundle_root: the bundle root holding ``models/model.pt``.
        config_file: more config files after inference.json and dicom.json (comma-separated), e.g. series rules.
        credentials_file: a file of one line ``user:password``, readable by you only; else ``$PACS_CREDENTIALS``.
        poll_s: seconds between polls of the change feed (``listen``).
        until_idle: ``listen`` returns once nothing is left to do.
        overwrite: ``segment`` segments and stores again a study whose results it stored before.
        backfill_from: ``listen`` first works through the studies that became stable before it started: from the
            feed's ``beginning``, or from a date (``YYYY-MM-DD``) on; by default it starts at the feed's end.
    """
    redact = Redactor()
    redact.install()
    # their INFO lines name each dataset they copy from or each request they make (hashed, but one line per call)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    if study_uid:
        redact.add_uid(study_uid, study=True)
    arguments = dict(locals())
    try:
        _run_command(**arguments)
    except (OSError, ValueError) as err:  # one line (scripts.tools.cli), with no identifier in it
        raise ValueError(redact(str(err))) from None
    except Exception as err:  # noqa: BLE001 (a failure we did not foresee: its traceback, redacted, then one line)
        logger.error("failed", exc_info=err)
        where = f"{case_of(study_uid)}: " if study_uid else ""
        raise ValueError(redact(f"{where}failed: {type(err).__name__}: {err}")) from None


def _run_command(
    redact,
    command,
    dicomweb_url,
    output_dir,
    study_uid,
    orthanc_url,
    bundle_root,
    config_file,
    credentials_file,
    poll_s,
    until_idle,
    overwrite,
    backfill_from,
):
    """``main``'s work, its arguments checked first."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    if command == "segment" and not study_uid:
        raise ValueError("segment needs --study_uid")
    if command == "segment" and backfill_from is not None:
        raise ValueError("--backfill_from is for listen")
    if command == "listen" and not orthanc_url:
        raise ValueError("listen needs --orthanc_url (Orthanc's REST root, for its /changes feed)")
    if poll_s <= 0:
        raise ValueError(f"--poll_s must be positive, got {poll_s}")
    if backfill_from is not None:
        _not_before(str(backfill_from))
    state = ListenerState(os.path.join(output_dir, STATE_FILE)) if command == "listen" else None
    pacs = Pacs(dicomweb_url, read_credentials(credentials_file), orthanc_url, redact=redact)
    pacs.check_connection()
    segmenter = StudySegmenter(pacs, output_dir, bundle_root, config_files(config_file))
    if command == "segment":
        segment(segmenter, study_uid, overwrite)
    else:
        start_listening(segmenter, state, poll_s, as_bool(until_idle, "until_idle"), backfill_from)


if __name__ == "__main__":
    run(main)
