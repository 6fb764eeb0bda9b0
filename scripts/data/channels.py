"""The model's inputs, each declared once: where each release and a PACS keep it, how it is normalised, whether every
case has it. The ISLES 2018 and 2024 readers, the datalist, the DICOM series rules, the pre-processing, make_studies
and the synthetic generator all take their channels from ``SPEC``; adding an input is one entry here and a profile
whose ``channels`` lists it (docs/architecture.md, "Where to change what").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = [
    "CHANNELS",
    "COMPUTED_MAPS",
    "HEALTHY_TMAX_S",
    "MAPS_SOURCE",
    "NCCT",
    "RAW_CTP",
    "SPEC",
    "TMAX_MEDIAN_LIMIT_S",
    "VENDOR_MAPS",
    "Channel",
    "channel",
    "check_channels",
    "computed_channels",
    "matches_description",
    "series_rules",
    "tmax_not_in_seconds",
]

# The tests of a map's default DICOM rule besides its description: a map, not a thresholded region or mask.
MAP_MODALITIES = ("CT", "MR", "OT")
MAP_EXCLUDE = "<|%|thresh|mask"


@dataclass(frozen=True)
class Channel:
    """One input of the model.

    Attributes:
        name: its name in ``channels``, in datalists and in messages.
        isles18: the modality tokens of its ISLES 2018 folders (``SMIR.Brain.XX.O.<token>.<id>``, any case); the first
            is what the generator writes; empty where ISLES 2018 has none.
        isles24: where ISLES 2024 keeps it, ``<tree>/[<folder>/]<ending>``: the tree (``raw`` or ``derivatives``), the
            folder inside the session folder, and the end of the file name after ``<subject>_<session>_``; empty
            where ISLES 2024 has none.
        series_rule: its default DICOM rule (docs/dicom.md): ``modality``, ``description`` and ``exclude`` (regular
            expressions on the SeriesDescription), optional ``image_type``; a site changes it in its own config.
        normalisation: ``"window"`` (``ct_window`` in HU to [0, 1], clipped) or ``"zscore"`` (within the non-zero
            voxels); with ``map_normalisation`` ``"window"`` the ``"zscore"`` inputs that have a ``window`` take it instead.
        window: its fixed window, mapped to [0, 1] and clipped, for ``map_normalisation`` ``"window"`` (the windows of
            the ISLES 2024 entries), in its own unit or, where ``relative``, as a multiple of the healthy tissue's
            mean.
        relative: ``window`` is relative to the mean over healthy tissue (Tmax at most 6 s, as the threshold core's
            reference), so that a map in any software's units reads as a fraction of normal.
        required: every case has it; the required inputs are the model's first, in ``SPEC``'s order, and a profile
            adds optional ones after them.
        synthetic: how the synthetic generator draws it from a case's arrays (name -> array, in the release's
            units); None for the required ones, which the generator draws itself; by default a float32 copy of CBF.
        computed: the bundle computes it from the raw CT perfusion series (``RAW_CTP``) of a case that has none of
            the computed inputs' files (``scripts.data.perfusion_maps``, in ISLES 2018's units).
    """

    name: str
    isles18: tuple = ()
    isles24: str = ""
    series_rule: dict = field(default_factory=dict)
    normalisation: str = "zscore"
    window: tuple = ()
    relative: bool = False
    required: bool = False
    synthetic: Callable | None = lambda arrays: np.asarray(arrays["CBF"], dtype=np.float32)
    computed: bool = False


def _perfusion_map(name, isles18, description, window, relative=False, exclude=MAP_EXCLUDE):
    """A required perfusion map: ISLES 2024 keeps it in ``perfusion-maps``, its DICOM rule takes maps of any modality
    named by ``description`` and not thresholded regions or masks."""
    rule = {"modality": list(MAP_MODALITIES), "description": description, "exclude": exclude}
    where = f"derivatives/perfusion-maps/space-ncct_{name.lower()}"
    return Channel(
        name, isles18, where, rule, window=window, relative=relative, required=True, synthetic=None, computed=True
    )


def _cta(arrays):
    """A CT angiography on the NCCT grid: the NCCT enhanced where the blood volume is (15 HU per mL/100 g), int16."""
    return np.rint(arrays["CT"].astype(np.float32) + 15.0 * arrays["CBV"]).astype(np.int16)


NCCT_RULE = {
    "modality": ["CT"],
    "description": "ncct|non.?contrast|w/?o|plain|nect|native|head|brain|cerebr|schaedel|skull|ct",
    "exclude": "cbf|cbv|mtt|t.?max|ttp|flow|volume|transit|perf|ctp|cta|angio|mip|dynamic|4d|bone|lung|scout|topo"
    "|\\+c\\b|post|contrast enh",
}
SPEC = (
    # the non-contrast CT: the grid the other inputs lie on, which the results are drawn on
    Channel("CT", ("CT",), "raw/ncct", NCCT_RULE, "window", required=True, synthetic=None),
    # the maps' windows: CBF and CBV 0-400 % of healthy tissue, MTT and Tmax 0-20 s; MR_: an early ISLES 2018 release's
    _perfusion_map("CBF", ("CT_CBF",), "\\br?cbf\\b|blood.?flow", (0.0, 4.0), relative=True),
    _perfusion_map("CBV", ("CT_CBV",), "\\br?cbv\\b|blood.?vol", (0.0, 4.0), relative=True),
    _perfusion_map("MTT", ("CT_MTT", "MR_MTT"), "\\bmtt\\b|mean.?transit", (0.0, 20.0)),
    _perfusion_map("Tmax", ("CT_Tmax", "MR_Tmax"), "t.?max|time.?to.?max", (0.0, 20.0), exclude="<|>|%|thresh|mask"),
    # ISLES 2024's CT angiography registered to the NCCT (configs/isles24_cta.json)
    Channel(
        "CTA",
        isles24="derivatives/space-ncct_cta",
        series_rule={
            "modality": ["CT"],
            "description": "\\bcta\\b|angio",
            "exclude": "mip|perf|ctp|4d|dynamic|cbf|cbv|mtt|t.?max",
        },
        window=(0.0, 200.0),
        synthetic=_cta,
    ),
)

# The raw 4D CT perfusion series: no input of the model, but what the ``computed`` inputs are computed from where a case
# has none of their files (ISLES 2018 ``CT_4DPWI``, ISLES 2024 ``raw/.../*_ctp``, a DICOM perfusion series).
RAW_CTP = Channel(
    "CTP",
    ("CT_4DPWI", "MR_4DPWI"),  # MR_: an early ISLES 2018 release's
    "raw/ctp",
    {
        "modality": ["CT"],
        "description": "perf|ctp|4d|dynamic",
        "exclude": "cbf|cbv|mtt|t.?max|ttp|flow|volume|transit|mip|<|%|thresh|mask|summary|map",
    },
    synthetic=None,
)
TMAX_MEDIAN_LIMIT_S = 5.0  # a Tmax map in seconds has its median over measured voxels (Tmax > 0) below this
HEALTHY_TMAX_S = 6.0  # tissue with a Tmax up to this (s) is healthy: the threshold core's reference and default
MAPS_SOURCE = "maps_source"  # the item key (and per_case.csv column) that says where a case's perfusion maps came from
VENDOR_MAPS = "vendor"
COMPUTED_MAPS = "computed by the bundle (oSVD)"

CHANNELS = tuple(c.name for c in SPEC if c.required)  # the model's inputs, in the order of metadata.json's channel_def
NCCT = CHANNELS[0]
# What reads SPEC reads it when called (``channel``, ``SPEC`` through this module), never a copy made at import: a test
# may add an entry (tests/test_channels.py).


def channel(name) -> Channel:
    """The ``SPEC`` entry of ``name``.

    Raises:
        ValueError: naming the inputs ``SPEC`` declares, for another name.
    """
    found = [c for c in SPEC if c.name == name]
    if not found:
        raise ValueError(f"no input named {name}; scripts/data/channels.py declares {[c.name for c in SPEC]}")
    return found[0]


def check_channels(channels):
    """Refuse a ``channels`` setting other than the required inputs in order, then some optional ones once each."""
    extra, optional = tuple(channels[len(CHANNELS) :]), [c.name for c in SPEC if not c.required]
    if tuple(channels[: len(CHANNELS)]) != CHANNELS or len(set(extra)) < len(extra) or set(extra) - set(optional):
        raise ValueError(
            f"channels {list(channels)}: the model's inputs are {', '.join(CHANNELS)}, in that order, then optionally"
            f" {', '.join(optional)}"
        )


def computed_channels(channels=CHANNELS) -> list:
    """The names of ``channels`` that the bundle computes from the raw series where a case has no vendor maps."""
    return [name for name in channels if channel(name).computed]


def series_rules(channels=CHANNELS, site_rules=None) -> dict:
    """The DICOM rule of each of ``channels``, and of the raw perfusion series (``RAW_CTP``, under its name) where
    some channel is ``computed``: its default with the tests that ``site_rules[name]`` gives replaced (configs/
    dicom.json's ``site_series_rules``).

    Raises:
        ValueError: for a site rule of a channel that ``SPEC`` does not declare.
    """
    site_rules = dict(site_rules or {})
    for name in site_rules:
        if name != RAW_CTP.name:
            channel(name)
    names = [*channels, *([RAW_CTP.name] if computed_channels(channels) else [])]
    defaults = {name: (RAW_CTP if name == RAW_CTP.name else channel(name)).series_rule for name in names}
    return {name: {**defaults[name], **site_rules.get(name, {})} for name in names}


def tmax_not_in_seconds(tmax):
    """The median of a Tmax map over its measured voxels (Tmax > 0) where it is above ``TMAX_MEDIAN_LIMIT_S``, so the
    map is not in seconds (tenths of a second, milliseconds: most brain tissue is healthy, 0-4 s); else None.

    Args:
        tmax: the Tmax map (a numpy array or a CPU tensor).
    """
    measured = np.asarray(tmax)[np.asarray(tmax) > 0]
    median = float(np.median(measured)) if measured.size else 0.0
    return median if median > TMAX_MEDIAN_LIMIT_S else None


def matches_description(rule, modality, description) -> bool:
    """Whether a series of ``modality`` and ``description`` passes a rule's modality and description tests (what a
    PACS query tells of a series before it is downloaded)."""
    if rule.get("modality") and modality not in rule["modality"]:
        return False
    if not re.search(rule["description"], description, re.IGNORECASE):
        return False
    return not (rule.get("exclude") and re.search(rule["exclude"], description, re.IGNORECASE))
