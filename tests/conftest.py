"""Shared fixtures: the repo root on sys.path first (so the project's ``tests``/``scripts`` win over any
installed package of the same name) and small synthetic ISLES trees written once per session."""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != REPO_ROOT:
    sys.path.insert(0, REPO_ROOT)

from scripts.synthetic_isles import generate  # noqa: E402


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory):
    """A small ISLES-layout tree: 10 training cases (some patients with two slabs), 2 testing cases."""
    root = tmp_path_factory.mktemp("isles")
    generate(str(root), num_train=10, num_test=2, seed=3, in_plane=32, slices=(2, 4, 8), two_slab_fraction=0.5)
    return str(root)
