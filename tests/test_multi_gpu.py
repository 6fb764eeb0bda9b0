"""configs/multi_gpu_train.json and multi_gpu_evaluate.json really launched with `torchrun --nproc_per_node=2` (gloo on
CPU) on tiny data."""

import csv
import glob
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from scripts.data.datalist import build_datalist
from scripts.engine.networks import ModifiedUNet
from scripts.report.cases import PER_CASE, SUMMARY

TINY = {"features": [2, 4, 8, 16, 32], "spatial_size": [32, 32, 16], "num_workers": 0}
TRAIN = {"batch_size": 1, "epochs": 2, "val_interval": 1}
ON_RANK0_ONLY = {"StatsHandler", "TensorBoardStatsHandler"}  # the handlers that write logs without knowing of ranks


class RankProbe:
    """Test instrumentation, attached to an engine through the config like any MONAI handler: the cases each
    epoch of this rank ran on, and at the end this rank's metrics, amp settings and network weights."""

    def __init__(self, path):
        self.path = path
        self.cases = defaultdict(list)

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_STARTED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def record(self, engine):
        self.cases[engine.state.epoch].extend(engine.state.batch["case"])

    def save(self, engine):
        torch.save(
            {
                "cases": dict(self.cases),
                "metrics": dict(engine.state.metrics),
                "amp_kwargs": engine.amp_kwargs,
                "weights": engine.network.module.state_dict(),
            },
            self.path,
        )


def per_rank(name):
    return f"$@bundle_root + '/{name}_rank' + os.environ['RANK']"


def probe_config(path):
    """Per-rank output folders (so that a file written by rank 1 would show) and a RankProbe on both engines."""
    config = {"ckpt_dir": per_rank("models"), "output_dir": per_rank("runs")}
    for engine in ("train", "validate"):
        config[f"+{engine}#handlers"] = [
            {"_target_": "tests.test_multi_gpu.RankProbe", "path": per_rank(f"probe_{engine}") + " + '.pt'"}
        ]
    with open(path, "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def split(synthetic_tree, tmp_path_factory):
    """A datalist of 9 cases with folds set by hand (not by patient): 6 training cases, an even number so that
    DistributedSampler pads nothing, and 3 validation cases (fold 0), which 2 ranks split 2 + 1."""
    datalist = build_datalist(synthetic_tree, folds=2, seed=0)
    datalist["training"] = [dict(item, fold=0 if i < 3 else 1) for i, item in enumerate(datalist["training"][:9])]
    path = tmp_path_factory.mktemp("split") / "datalist.json"
    with open(path, "w") as f:
        json.dump(datalist, f)
    cases = {fold: {item["case"] for item in datalist["training"] if item["fold"] == fold} for fold in (0, 1)}
    return {"dataset_dir": synthetic_tree, "data_list_file_path": str(path), **TINY}, cases


def torchrun(repo_root, run_id, configs, bundle_root, **override):
    """`torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run RUN_ID ...` on CPU with gloo; the
    device given as users type it, `--device cpu` (a string, not a torch.device)."""
    override = {"bundle_root": bundle_root, "backend": "gloo", "device": "cpu", **override}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        repr(configs),
        *[x for key, value in override.items() for x in (f"--{key}", str(value))],
    ]
    scratch = Path(bundle_root).parent / "torchrun_tmp"  # torchrun leaves a torchelastic_* folder in $TMPDIR
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    result = subprocess.run(cmd, cwd=repo_root, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def ddp_run(repo_root, split, tmp_path_factory):
    """Two epochs on 2 CPU processes: 6 training cases (3 per rank) and 3 validation cases (2 + 1)."""
    settings, cases = split
    root = tmp_path_factory.mktemp("ddp")
    configs = ["configs/train.json", "configs/multi_gpu_train.json", probe_config(root / "probe.json")]
    result = torchrun(repo_root, "training", configs, root, **settings, **TRAIN)
    return root, result, cases


def load_probe(root, engine, rank):
    return torch.load(root / f"probe_{engine}_rank{rank}.pt", map_location="cpu")


def test_ranks_train_on_disjoint_halves(ddp_run):
    root, _, cases = ddp_run
    probes = [load_probe(root, "train", rank) for rank in (0, 1)]
    for epoch in (1, 2):
        seen = [set(p["cases"][epoch]) for p in probes]
        assert len(seen[0]) == len(seen[1]) == 3 and not seen[0] & seen[1], seen
        assert seen[0] | seen[1] == cases[1]


def test_validation_is_split_and_metrics_are_gathered(ddp_run):
    root, _, cases = ddp_run
    probes = [load_probe(root, "validate", rank) for rank in (0, 1)]
    for epoch in (1, 2):
        seen = [p["cases"][epoch] for p in probes]
        assert sorted(map(len, seen)) == [1, 2] and set(seen[0]) | set(seen[1]) == cases[0], seen
    # each rank holds different cases, so equal metrics on both ranks are the metrics of all 3 cases
    assert set(probes[0]["metrics"]) == {"val_mean_dice", "val_jaccard", "val_precision", "val_recall", "val_lesion_f1"}
    assert probes[0]["metrics"] == probes[1]["metrics"]


def test_rank0_alone_writes_one_checkpoint_holding_the_final_weights(ddp_run):
    root, result, _ = ddp_run
    assert [os.path.basename(p) for p in glob.glob(str(root / "models_rank0" / "checkpoint_epoch=*.pt"))] == [
        "checkpoint_epoch=2.pt"
    ]
    assert os.path.isfile(root / "models_rank0" / "model.pt")
    assert glob.glob(str(root / "runs_rank0" / "events.out.tfevents.*"))
    rank1_files = [f for folder in ("models_rank1", "runs_rank1") for _, _, fs in os.walk(root / folder) for f in fs]
    assert rank1_files == []
    assert result.stdout.count("Saved checkpoint at epoch") == 2, "ranks > 0 log nothing below WARNING"

    saved = torch.load(root / "models_rank0" / "checkpoint_epoch=2.pt", map_location="cpu")["model"]
    ModifiedUNet(features=[2, 4, 8, 16, 32]).load_state_dict(saved)  # strict: no DDP "module." prefix
    for rank in (0, 1):
        final = load_probe(root, "train", rank)["weights"]
        assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in saved), rank


def test_a_distributed_run_replaces_an_earlier_one_in_a_shared_checkpoint_folder(repo_root, split, tmp_path):
    """An --overwrite torchrun into the folder of an earlier one: the earlier run's checkpoints are gone, its model is
    replaced by the new run's validation and no outdated marker is left (rank 0 alone removes and marks)."""
    settings, _ = split
    configs = ["configs/train.json", "configs/multi_gpu_train.json"]
    torchrun(repo_root, "training", configs, tmp_path, **settings, batch_size=1, epochs=1, val_interval=1)
    model = tmp_path / "models" / "model.pt"
    before = model.read_bytes()
    again = {**settings, "batch_size": 1, "epochs": 1, "val_interval": 1, "seed": 1, "overwrite": "true"}
    torchrun(repo_root, "training", configs, tmp_path, **again)
    assert model.read_bytes() != before and not (tmp_path / "models" / "model.pt.outdated").exists()
    assert [p.name for p in (tmp_path / "models").glob("checkpoint_epoch=*.pt")] == ["checkpoint_epoch=1.pt"]


def test_amp_dtype_reaches_both_engines(ddp_run):
    root, _, _ = ddp_run
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    for engine in ("train", "validate"):
        assert load_probe(root, engine, 0)["amp_kwargs"] == {"dtype": expected}


def test_only_log_writers_are_left_out_on_other_ranks(repo_root):
    """multi_gpu_train.json sets `write_logs` (rank 0 only), which leaves out exactly the log writers: no handler is
    named by its list position. Evaluation has no log writer: rank 0 alone prints its summary (tested below)."""
    parser = ConfigParser()
    parser.read_config([os.path.join(repo_root, "configs", name) for name in ("train.json", "multi_gpu_train.json")])
    assert parser["write_logs"] == "@is_rank0"
    parser.parse()  # `%file#id` macros copied in
    ids = [
        f"{list_id}#{i}" if isinstance(h, dict) else h[1:]
        for list_id in ("train#handlers", "validate#handlers")
        for i, h in enumerate(parser[list_id])
    ]
    for write_logs in (True, False):
        parser["write_logs"] = write_logs
        parser.parse()
        left_out = {
            parser[i]["_target_"]
            for i in ids
            if "_disabled_" in parser[i] and parser.get_parsed_content(f"{i}#_disabled_")
        }
        assert left_out == (set() if write_logs else {parser[i]["_target_"] for i in ids} & ON_RANK0_ONLY)
    assert {parser[i]["_target_"] for i in ids} & ON_RANK0_ONLY
    evaluation = ConfigParser()
    evaluation.read_config([os.path.join(repo_root, "configs", name) for name in ("inference.json", "evaluate.json")])
    assert not {h.get("_target_") for h in evaluation["handlers"] if isinstance(h, dict)} & ON_RANK0_ONLY


def read_csv(path):
    with open(path, newline="") as f:
        return sorted(csv.DictReader(f), key=lambda row: next(iter(row.values())))


def same_values(a, b):
    return a.keys() == b.keys() and all(
        x == y or math.isclose(float(x), float(y), rel_tol=1e-6) or math.isnan(float(x)) and math.isnan(float(y))
        for x, y in zip(a.values(), b.values())
    )


@pytest.fixture(scope="module")
def ddp_eval(repo_root, split, ddp_run, tmp_path_factory):
    """`run evaluating` of the model trained above: once in one process, once with torchrun on 2 CPU processes,
    each rank writing into its own prediction_dir (so that what rank 1 writes shows)."""
    settings, cases = split
    root = tmp_path_factory.mktemp("ddp_eval")
    # float32: the ranks and the single process must give the same masks to the voxel (bf16 kernels may round
    # differently with other thread counts; bf16 against float32 is tested in test_precision.py)
    settings = {**settings, "ckpt_dir": str(ddp_run[0] / "models_rank0"), "amp": False}
    configs = [os.path.join(repo_root, "configs", name) for name in ("inference.json", "evaluate.json")]
    single = ConfigWorkflow(config_file=configs, workflow_type="infer", bundle_root=str(root / "single"), **settings)
    single.initialize()
    single.run()
    configs = ["configs/inference.json", "configs/evaluate.json", "configs/multi_gpu_evaluate.json"]
    result = torchrun(
        repo_root,
        "evaluating",
        configs,
        root / "ddp",
        **settings,
        prediction_dir="$@output_dir + '/eval_rank' + os.environ['RANK']",
    )
    return root / "single" / "runs" / "eval", [root / "ddp" / "runs" / f"eval_rank{r}" for r in (0, 1)], result, cases


def test_evaluation_splits_cases_and_rank0_writes_the_same_report(ddp_eval):
    single, ranks, result, cases = ddp_eval
    masks = [sorted(os.listdir(rank / "masks")) for rank in ranks]
    assert sorted(map(len, masks)) == [1, 2] and sorted(masks[0] + masks[1]) == sorted(os.listdir(single / "masks"))
    assert sorted(m.split(".")[0] for m in masks[0] + masks[1]) == sorted(cases[0])
    for rank, names in zip(ranks, masks):
        for name in names:
            written, reference = (nib.load(folder / "masks" / name).get_fdata() for folder in (rank, single))
            assert np.array_equal(written, reference), name
    assert set(os.listdir(ranks[1])) == {
        "masks",
        "overlays",
    }, "rank 1 writes its cases' masks and overlays, no CSV, no run.json and no lock"
    assert sorted(os.listdir(ranks[1] / "overlays")) == [m.replace(".nii.gz", ".png") for m in masks[1]]
    for name in (PER_CASE, SUMMARY):
        ddp, ref = read_csv(ranks[0] / name), read_csv(single / name)
        assert len(ddp) == len(ref) and all(same_values(a, b) for a, b in zip(ddp, ref)), name
    assert len(read_csv(ranks[0] / PER_CASE)) == 3
    assert result.stdout.count("3 cases, per-case values in") == 1, "the summary of the model and baseline, on rank 0"
