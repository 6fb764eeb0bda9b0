"""Shared fixtures: the repo root on sys.path first (so the project's ``tests``/``scripts`` win over any
installed package of the same name) and small synthetic ISLES trees written once per session."""

import json
import os
import subprocess
import sys
import warnings

import pytest
from filelock import FileLock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path[0] != REPO_ROOT:
    sys.path.insert(0, REPO_ROOT)

# Under pytest-xdist (README command 2: two workers) the cores are shared out between the workers: each worker, and
# every process it starts, computes on its share of threads (OMP_NUM_THREADS, read when torch loads, unless set
# already). Two workers of two threads each on 2 cores contended: the suite took 903 s against 732 s with one thread
# each (`python -m pytest tests -q -n 2 --dist loadfile`, one run each on this project's 2-core machine).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# MONAI imports pytorch-ignite, whose ignite/handlers/checkpoint.py imports torch.distributed.optim, whose functional
# optimisers torch 2.13 compiles at import with the @torch.jit.script (66 times) and @torch.jit.interface it deprecates:
# torch's own code run at import, nothing a call of ours can change, and silent outside pytest (a DeprecationWarning
# raised in a library). Imported first here, so that pytest does not list these 67 warnings for every test process.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.(script|interface)` is deprecated", DeprecationWarning)
    import torch.distributed.optim  # noqa: F401

from helpers import TINY_NETWORK, bundle_run_command  # noqa: E402
from scripts.engine.inferers import NATIVE_BF16_ENV  # noqa: E402
from scripts.synthetic.isles import generate  # noqa: E402

# No test depends on this CPU's bfloat16: the suite (and every process it starts) runs as on a CPU without it, and
# the tests of the native path set it themselves (tests/test_precision.py).
os.environ[NATIVE_BF16_ENV] = "false"


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory):
    """The user's cache folder (``XDG_CACHE_HOME``: OpenVINO's converted networks) of the suite and of every process
    it starts, in a temp folder: no test reads or writes the real one."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user_cache"))
    yield os.environ["XDG_CACHE_HOME"]
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory):
    """A small ISLES-layout tree: 10 training cases (some patients with two slabs), 2 testing cases."""
    root = tmp_path_factory.mktemp("isles")
    generate(str(root), num_train=10, num_test=2, seed=3, in_plane=32, slices=(2, 4, 8), two_slab_fraction=0.5)
    return str(root)


# A shorter demo (README command 1): 12 cases, 30 epochs at 32 x 32 x 16.
DEMO_OVERRIDES = {
    "num_cases": 12,
    "epochs": 30,
    "val_interval": 10,
    "spatial_size": [32, 32, 16],
    "learning_rate": 0.003,
}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`python -m monai.bundle run training` of train.json + demo.json in a temp bundle root, once per test session,
    whose pytest-xdist workers share it (xdist's documented FileLock pattern; the run's output kept in files beside it):
    the root, the finished process and the overrides (its model is demo_data/models/model.pt)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "demo"  # the session's folder above every worker's own
    else:
        root = tmp_path_factory.mktemp("demo")
    configs = "['configs/train.json','configs/demo.json']"
    cmd = bundle_run_command("training", configs, bundle_root=root, **DEMO_OVERRIDES)
    output = {name: root.parent / f"demo_{name}.txt" for name in ("stdout", "stderr")}
    with FileLock(f"{root}.lock"):
        if not output["stderr"].is_file():
            root.mkdir(exist_ok=True)
            result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
            assert result.returncode == 0, result.stderr[-3000:]
            for name, path in output.items():
                path.write_text(getattr(result, name))
    result = subprocess.CompletedProcess(cmd, 0, output["stdout"].read_text(), output["stderr"].read_text())
    return root, result, DEMO_OVERRIDES


def tiny_training(bundle_root, dataset_dir, **override):
    """MONAI's ``ConfigWorkflow`` of configs/train.json that trains the tiny network for one epoch on the ISLES tree
    ``dataset_dir`` into ``bundle_root``, with the 3-fold datalist of ``build_datalist`` written there first
    (datalist.json); ``override`` sets other ids."""
    from monai.bundle import ConfigWorkflow
    from scripts.data.datalist import build_datalist

    datalist = os.path.join(bundle_root, "datalist.json")
    with open(datalist, "w") as f:
        json.dump(build_datalist(str(dataset_dir), folds=3, seed=0), f)
    return ConfigWorkflow(
        config_file=os.path.join(REPO_ROOT, "configs", "train.json"),
        meta_file=os.path.join(REPO_ROOT, "configs", "metadata.json"),
        workflow_type="train",
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        data_list_file_path=datalist,
        **{"epochs": 1, "val_interval": 1, **TINY_NETWORK, **override},
    )


@pytest.fixture(scope="session")
def tiny_model(synthetic_tree, tmp_path_factory):
    """A bundle root whose models/model.pt is a tiny network trained for one epoch on the session's synthetic tree."""
    root = tmp_path_factory.mktemp("tiny_bundle")
    workflow = tiny_training(root, synthetic_tree)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert (root / "models" / "model.pt").is_file()
    return root


@pytest.fixture(scope="session")
def dicom_tree(tmp_path_factory):
    """Two synthetic testing cases written as NIfTI (TESTING/) and as DICOM studies (dicom/TESTING/)."""
    root = tmp_path_factory.mktemp("dicom_isles")
    generate(str(root), num_train=0, num_test=2, seed=11, in_plane=32, slices=(4, 6), dicom=True)
    return root
