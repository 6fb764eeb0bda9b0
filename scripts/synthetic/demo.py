"""The CPU demo (configs/demo.json): its synthetic data, and its network settings for the tools that need them."""

from __future__ import annotations

import json
import os

from scripts import BUNDLE_ROOT
from scripts.data.datalist import build_datalist
from scripts.safe_files import write_atomically
from scripts.synthetic.isles import generate

__all__ = ["network_settings", "prepare_demo_data"]

DEMO_CONFIG = os.path.join(BUNDLE_ROOT, "configs", "demo.json")


def network_settings() -> dict:
    """``features`` and ``spatial_size`` of the demo network, as configs/demo.json sets them (their one place)."""
    with open(DEMO_CONFIG) as f:
        config = json.load(f)
    return {key: config[key] for key in ("features", "spatial_size")}


def prepare_demo_data(dataset_dir: str, datalist_path: str, num_cases: int, seed: int) -> None:
    """Write what the demo trains on, each part only if it is not there yet: a synthetic ISLES tree of ``num_cases``
    training and 4 testing cases, and its checked 5-fold datalist.

    Args:
        dataset_dir: the tree's root.
        datalist_path: the datalist file.
        num_cases: training cases to generate.
        seed: the generator's and the folds' seed.
    """
    if not os.path.isdir(dataset_dir):
        generate(dataset_dir, num_train=num_cases, num_test=4, seed=seed)
    if not os.path.isfile(datalist_path):
        datalist = build_datalist(dataset_dir, folds=5, seed=seed, check=True)
        write_atomically(datalist_path, lambda f: f.write(json.dumps(datalist, indent=2).encode()))
