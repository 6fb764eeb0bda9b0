"""Segment CT perfusion studies from a PACS and store the results back in it, over DICOMweb: one study
(``segment``), or each study as it becomes stable in Orthanc (``listen``, its ``/changes`` feed). See docs/dicom.md.

    # one study: pull its series (QIDO-RS, WADO-RS), segment it (configs/inference.json + configs/dicom.json),
    # store the DICOM SEG and SR back (STOW-RS)
    python -m scripts.tools.pacs segment --dicomweb_url http://pacs:8042/dicom-web --study_uid 1.2.3... \\
        --output_dir OUT [--bundle_root .] [--credentials_file FILE] [--config_file my_settings.json]
    # every new stable study, until stopped (or, with --until_idle true, until nothing is left to do)
    python -m scripts.tools.pacs listen --dicomweb_url http://pacs:8042/dicom-web --orthanc_url http://pacs:8042 \\
        --output_dir OUT [--bundle_root .] [--credentials_file FILE] [--poll_s 2]

Credentials: ``--credentials_file`` (one line ``user:password``) or ``$PACS_CREDENTIALS``, never on the command line.
Only the series that ``series_rules`` may pick are retrieved, into memory (no copy on disk); each study's run writes
``OUT/results/<case>/predictions/`` (mask, overlay, volumes.csv, ``dicom/<case>/seg.dcm`` and ``sr.dcm``) and, once
they are stored, ``OUT/results/<case>/stored.json``: ``segment`` then refuses the study again without ``--overwrite
true``; a run stopped before that is done again by the same command. A study refused by the checks sends nothing.
The listener keeps its place in ``OUT/listener.json``: after a restart (even after kill -9) it continues with the
change it was in; a study done again gets results of the same UIDs, which the PACS keeps once; a study whose input
series have not changed since it was handled (e.g. its StableStudy event after our own SEG and SR arrived) is not
done again.
"""

from __future__ import annotations

import json
import logging
import os
import time

import requests
from monai.bundle import ConfigParser, ConfigWorkflow
from scripts.data.readers import InvalidCaseError
from scripts.dicom.dicomweb import ListenerState, Pacs, fingerprint, read_credentials
from scripts.dicom.series import case_of, matches_description, studies_in_memory
from scripts.flags import as_bool
from scripts.safe_files import write_atomically
from scripts.tools.cli import run

logger = logging.getLogger(__name__)

BUNDLE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = ("inference.json", "dicom.json")
STATE_FILE = "listener.json"
STORED = "stored.json"  # in a study's results folder once its SEG and SR are in the PACS
COMMANDS = ("segment", "listen")


def config_files(config_file) -> list:
    """inference.json, dicom.json and the comma-separated ``config_file``s after them (each must exist)."""
    extra = [path for path in (config_file or "").split(",") if path]
    missing = [path for path in extra if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"--config_file {missing[0]}: no such file")
    return [os.path.join(BUNDLE_DIR, "configs", name) for name in CONFIGS] + extra


class StudySegmenter:
    """Pulls one study, segments it with the bundle's DICOM profile and stores its SEG and SR.

    Args:
        pacs: the ``scripts.dicom.dicomweb.Pacs``.
        output_dir: where the results (``results/<case>/``) go.
        bundle_root: the bundle root (its ``models/model.pt``).
        config_files: inference.json, dicom.json and the user's own configs, in order.
    """

    def __init__(self, pacs, output_dir, bundle_root, config_files):
        self.pacs, self.output_dir, self.bundle_root, self.config_files = pacs, output_dir, bundle_root, config_files
        parser = ConfigParser()
        parser.read_config(config_files)
        self.rules = parser.get_parsed_content("series_rules")
        self.channels = parser.get_parsed_content("channels")

    def inputs(self, study_uid) -> list:
        """The study's series that a rule may pick (by modality and description, as the PACS lists them)."""
        return [
            series
            for series in self.pacs.input_series(study_uid)
            if any(matches_description(rule, series[2], series[1]) for rule in self.rules.values())
        ]

    def __call__(self, study_uid, series, overwrite) -> list:
        """Segment the study from its ``series`` (``inputs``'s) and store the results; returns the stored files."""
        case = case_of(study_uid)
        if not series:
            raise InvalidCaseError(f"{case}: no series of the study matches series_rules")
        results = os.path.join(self.output_dir, "results", case)
        stored = os.path.join(results, STORED)
        if os.path.isfile(stored) and not as_bool(overwrite, "overwrite"):
            raise FileExistsError(
                f"{results}: this study's SEG and SR were stored in the PACS ({stored}); pass --overwrite true to"
                " segment and store it again"
            )
        studies = studies_in_memory(self.pacs.retrieve(study_uid, series), self.rules, self.channels)
        workflow = ConfigWorkflow(
            config_file=self.config_files,
            meta_file=os.path.join(BUNDLE_DIR, "configs", "metadata.json"),
            logging_file=os.path.join(BUNDLE_DIR, "configs", "logging.conf"),
            workflow_type="infer",
            bundle_root=self.bundle_root,
            dataset_dir=self.output_dir,  # the root of the series keys (scripts.dicom.series.series_key)
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
        self.pacs.store(files)
        record = json.dumps({"stored": [os.path.relpath(path, results) for path in files]})
        write_atomically(stored, lambda f: f.write(record.encode()))
        logger.info("%s: stored its SEG and SR", case)
        return files


def _refusal(err):
    """The ``ValueError``/``OSError`` (a refused study or folder) that MONAI's ``RuntimeError`` wraps, else ``err``."""
    cause = err
    while cause is not None and not isinstance(cause, (ValueError, OSError)):
        cause = cause.__cause__
    return cause or err


def listen(segmenter, state, poll_s, until_idle) -> None:
    """Follow Orthanc's change feed from ``state.since``, segmenting each stable study whose inputs are new.

    Args:
        segmenter: the ``StudySegmenter``.
        state: the ``scripts.dicom.dicomweb.ListenerState``.
        poll_s: seconds between polls of an exhausted feed.
        until_idle: return once the feed is exhausted and every study is stable, instead of polling on.
    """
    while True:
        try:
            feed = segmenter.pacs.changes(state.since)
            for change in feed["Changes"]:
                study = change["ChangeType"] == "StableStudy"
                if study:
                    _handle_study(segmenter, state, change["ID"])
                state.since = int(change["Seq"])
                if study:
                    state.save()  # a study's outcome is kept the moment it is known
            if feed["Changes"]:
                state.save()  # the page's other changes (instances arriving): after a kill, at most a page re-read
            if feed["Done"] and until_idle and segmenter.pacs.all_stable():
                if not segmenter.pacs.changes(state.since)["Changes"]:
                    return
        except requests.RequestException as err:  # the PACS restarting or the network down: try again
            logger.warning("the PACS did not answer (%s); trying again in %s s", type(err).__name__, poll_s)
            feed = {"Done": True}
        if feed["Done"]:
            time.sleep(poll_s)


def _handle_study(segmenter, state, orthanc_id):
    study_uid = segmenter.pacs.study_uid(orthanc_id)
    if study_uid is None:
        return
    case = case_of(study_uid)
    series = segmenter.inputs(study_uid)
    inputs = fingerprint(series)
    if state.is_done(case, inputs):
        logger.info("%s: already handled with these series", case)
        return
    try:
        segmenter(study_uid, series, overwrite=True)  # the listener's own folder: a study done again is replaced
        outcome = "stored"
    except requests.RequestException:  # the PACS, not the study: the change is handled again on the next poll
        raise
    except (ValueError, OSError) as err:  # refused by the checks: recorded, not tried again until it changes
        logger.error("%s: not segmented, nothing sent: %s", case, err)
        outcome = f"refused: {err}"
    state.record(case, inputs, outcome)


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
):
    """Segment one study of a PACS (``segment``) or each new stable study of an Orthanc (``listen``).

    Args:
        command: ``segment`` or ``listen``.
        dicomweb_url: the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``.
        output_dir: the folder for downloads, results and the listener's state.
        study_uid: the StudyInstanceUID to segment (``segment``).
        orthanc_url: Orthanc's REST root, e.g. ``http://pacs:8042`` (``listen``).
        bundle_root: the bundle root holding ``models/model.pt``.
        config_file: more config files after inference.json and dicom.json (comma-separated), e.g. series rules.
        credentials_file: a file of one line ``user:password``; else ``$PACS_CREDENTIALS``.
        poll_s: seconds between polls of the change feed (``listen``).
        until_idle: ``listen`` returns once nothing is left to do.
        overwrite: ``segment`` segments and stores again a study whose results it stored before.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    if command == "segment" and not study_uid:
        raise ValueError("segment needs --study_uid")
    if command == "listen" and not orthanc_url:
        raise ValueError("listen needs --orthanc_url (Orthanc's REST root, for its /changes feed)")
    if poll_s <= 0:
        raise ValueError(f"--poll_s must be positive, got {poll_s}")
    pacs = Pacs(dicomweb_url, read_credentials(credentials_file), orthanc_url)
    segmenter = StudySegmenter(pacs, output_dir, bundle_root, config_files(config_file))
    if command == "segment":
        segmenter(study_uid, segmenter.inputs(study_uid), overwrite)
    else:
        listen(segmenter, ListenerState(os.path.join(output_dir, STATE_FILE)), poll_s, until_idle)


if __name__ == "__main__":
    run(main)
