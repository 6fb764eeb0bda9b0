"""How logs, messages and file names name a DICOM identifier: a hash, never the UID itself."""

import hashlib

__all__ = ["case_of", "uid_name"]


def _digits(uid) -> str:
    return hashlib.sha256(str(uid).encode()).hexdigest()[:12]


def case_of(study_uid) -> str:
    """A study's case name: ``study-`` and 12 hex digits of its StudyInstanceUID's SHA-256."""
    return "study-" + _digits(study_uid)


def uid_name(uid) -> str:
    """How logs and messages name any other UID (an identifier): ``uid-`` and 12 hex digits of its SHA-256."""
    return "uid-" + _digits(uid)
