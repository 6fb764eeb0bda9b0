"""The bundle on one GPU, in about 5 minutes: training speed, memory, whole-case inference, and every config's CUDA path.

    python benchmarks/gpu.py --output benchmarks/gpu_results.json

It refuses to run without CUDA (exit status 2, nothing written). What it measures and checks, each printed as a table
and written to one JSON file:
- ``train_step``: the paper-size training step (batch 2, features 64-1024, input 128 x 128 x 32, Jaccard loss, Adam),
  float32 and AMP (``torch.autocast("cuda")`` float16 with a gradient scaler, as configs/train.json's ``amp`` runs
  it), ``channels_last_3d`` on and off: milliseconds per step and peak GPU memory; and the time 650 epochs of 47
  steps (the paper's 94 cases, batch 2) take at that step time;
- ``epoch``: two epochs of configs/train.json over 94 synthetic training cases cached on the device (``CacheDataset``
  of tensors moved to the GPU by the last deterministic transform, ``ThreadDataLoader``: the random augmentations run
  on the GPU), paper size, AMP: the second epoch's time and steps, and the peak GPU memory;
- ``inference``: configs/inference.json on synthetic testing cases, paper features, per case once the workflow runs
  and per run with its start-up;
- ``configs``: training (train.json), evaluation (evaluate.json), inference (inference.json) and, on a machine with
  2 GPUs, a 2-process DDP training (multi_gpu_train.json, NCCL) each run on CUDA with a small network: passed or the
  error.
``--allow_cpu true`` runs the same code on the CPU at a tiny size (tests/test_backends.py does, to check the script):
its figures say nothing about a GPU and are labelled so.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from scripts.engine.networks import ModifiedUNet  # noqa: E402
from scripts.flags import as_bool  # noqa: E402
from scripts.safe_files import write_atomically  # noqa: E402
from scripts.tools.cli import run  # noqa: E402

from benchmarks.run import SIZES, batch, inference_bundle, print_table, synthetic_datalist, whole_case_run  # noqa: E402

PAPER_EPOCHS, PAPER_CASES = 650, 94
NO_CUDA = "benchmarks/gpu.py measures a GPU and this machine has no CUDA device (torch.cuda.is_available() is False)"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device):
    """Peak GPU memory allocated by torch since the last ``reset_peak``, in MiB (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def training_step(device, features, channels_last, amp):
    """One training step of a fresh paper network as configs/train.json runs it on ``device``: ``amp`` is
    ``torch.autocast`` (float16 on CUDA) with a gradient scaler, as MONAI's ``SupervisedTrainer`` does."""
    from monai.losses import DiceLoss

    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    net = ModifiedUNet(features=features).to(device, memory_format=layout).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, weight_decay=1e-3)
    amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loss_fn = DiceLoss(jaccard=True, include_background=False, to_onehot_y=True, softmax=True, batch=True)

    def step(image, label):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(net(image.to(memory_format=layout)).float(), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def train_steps(device, size, steps):
    """Milliseconds per training step and peak memory, float32 and AMP, channels_last_3d off and on."""
    bs, features, spatial = SIZES[size]
    image, label = (t.to(device) for t in batch(bs, spatial))
    rows = []
    for channels_last in (False, True):
        for amp in (False, True):
            step = training_step(device, features, channels_last, amp)
            for _ in range(3):  # warm-up: cuDNN picks its kernels
                step(image, label)
            synchronize(device)
            reset_peak(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(image, label)
            synchronize(device)
            step_ms = (time.perf_counter() - start) / steps * 1000
            rows.append(
                {
                    "channels_last_3d": channels_last,
                    "amp": amp,
                    "step_ms": step_ms,
                    "peak_mib": peak_mib(device),
                    "paper_650_epochs_min": step_ms * -(-PAPER_CASES // bs) * PAPER_EPOCHS / 60000,
                }
            )
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def epoch(device, size, workdir, cases):
    """Two epochs of configs/train.json with the preprocessed cases cached on ``device``; the second one's time."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    bs, features, spatial = SIZES[size]
    root, path, fold = synthetic_datalist(os.path.join(workdir, "epoch"), num_cases=cases, folds=5)  # 118: 94 to train
    wf = ConfigWorkflow(
        config_file=os.path.join(REPO_ROOT, "configs", "train.json"),
        meta_file=os.path.join(REPO_ROOT, "configs", "metadata.json"),
        workflow_type="train",
        bundle_root=os.path.join(workdir, "epoch", "bundle"),
        dataset_dir=root,
        data_list_file_path=path,
        device=device,
        features=features,
        spatial_size=spatial,
        batch_size=bs,
        amp=device.type == "cuda",
        epochs=2,
        val_interval=100,
        num_workers=0,
        check_inputs=False,
        # the cached items end on the device: the last transform before the random ones moves them there
        patch_sampling=[{"_target_": "ToDeviced", "keys": ["@image_key", "@label_key"], "device": device}],
        **{"train#dataloader#_target_": "ThreadDataLoader"},
    )
    reset_peak(device)
    start = time.perf_counter()
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    marks = []
    for event in (Events.EPOCH_STARTED, Events.EPOCH_COMPLETED):
        trainer.add_event_handler(event, lambda: (synchronize(device), marks.append(time.perf_counter())))
    wf.run()
    wf.finalize()
    total = time.perf_counter() - start
    steps = trainer.state.epoch_length
    second = marks[3] - marks[2]
    return {
        "training_cases": len(fold["train"]),
        "steps_per_epoch": steps,
        "first_epoch_s": marks[1] - marks[0],
        "second_epoch_s": second,
        "step_ms_in_epoch": second / steps * 1000,
        "caching_start_and_validation_s": total - (marks[3] - marks[0]),
        "peak_mib": peak_mib(device),
        "paper_650_epochs_min": second / steps * -(-PAPER_CASES // bs) * PAPER_EPOCHS / 60,
    }


def inference(device, size, workdir, cases=6):
    """configs/inference.json on ``cases`` synthetic testing cases (an untrained network of ``size``'s features)."""
    root, bundle_root = inference_bundle(size, workdir, cases)
    per_case, run_s, _ = whole_case_run(size, bundle_root, root, workdir, "auto", None, cases, device=str(device))
    return {"cases": cases, "per_case_s": per_case, "run_per_case_s": run_s}


def config_checks(device, workdir):
    """Training, evaluation and inference configs run on ``device`` with a small network, and a 2-process DDP
    training where the machine has 2 GPUs: each one's outcome, seconds, and the end of its error."""
    root, path, _ = synthetic_datalist(os.path.join(workdir, "checks"), num_cases=10)
    bundle_root = os.path.join(workdir, "checks", "bundle")
    common = {"bundle_root": bundle_root, "dataset_dir": root, "features": [2, 4, 8, 16, 32], "device": str(device)}
    common.update({"spatial_size": [32, 32, 16], "num_workers": 0, "check_inputs": False})
    train = {**common, "data_list_file_path": path, "epochs": 1, "val_interval": 1}
    runs = {
        "training (train.json)": (["train.json"], "training", train),
        "evaluation (inference.json + evaluate.json)": (
            ["inference.json", "evaluate.json"],
            "evaluating",
            {**common, "data_list_file_path": path, "ckpt_dir": os.path.join(bundle_root, "models")},
        ),
        "inference (inference.json)": (
            ["inference.json"],
            "run",
            {**common, "dataset_dir": os.path.join(root), "ckpt_dir": os.path.join(bundle_root, "models")},
        ),
    }
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    rows = []
    for name, (configs, run_id, settings) in runs.items():
        rows.append(bundle_command(name, configs, run_id, settings))
    if gpus >= 2:
        ddp = {**train, "bundle_root": os.path.join(workdir, "checks", "ddp")}
        ddp.pop("device")
        rows.append(
            bundle_command(
                "2-process DDP (multi_gpu_train.json)",
                ["train.json", "multi_gpu_train.json"],
                "training",
                ddp,
                torchrun=2,
            )
        )
    else:
        rows.append({"check": "2-process DDP (multi_gpu_train.json)", "outcome": f"not run: {gpus} GPU(s)"})
    return rows


def bundle_command(name, configs, run_id, settings, torchrun=0):
    """``python -m monai.bundle run RUN_ID`` (under ``torchrun --nproc_per_node=N`` if ``torchrun``) as a user types
    it; passed, or the last lines of its output."""
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={torchrun}",
    ]
    cmd = [*(launcher if torchrun else [sys.executable]), "-m", "monai.bundle", "run", run_id]
    cmd += ["--config_file", repr([os.path.join("configs", c) for c in configs])]
    cmd += [x for key, value in settings.items() for x in (f"--{key}", str(value).replace(" ", ""))]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    row = {
        "check": name,
        "outcome": "passed" if result.returncode == 0 else "FAILED",
        "seconds": time.perf_counter() - start,
    }
    if result.returncode:
        row["error"] = (result.stdout + result.stderr)[-2000:]
    return row


def machine(device):
    info = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            gpus=torch.cuda.device_count(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        info["note"] = "--allow_cpu: a check of this script on the CPU at a tiny size, no GPU figure"
    return info


def main(output: str = "benchmarks/gpu_results.json", steps: int = 10, cases: int = 118, allow_cpu: bool = False):
    """Measure and check the bundle on one GPU (see the module docstring); write ``output`` (JSON).

    Args:
        output: the JSON file of every figure.
        steps: timed training steps per variant, after 3 warm-up steps.
        cases: synthetic training-tree size for the epoch; a 5-fold datalist of 118 gives 94 training cases.
        allow_cpu: run at a tiny size on the CPU when there is no CUDA (a check of the script, not a measurement).
    """
    cuda = torch.cuda.is_available()
    if not cuda and not as_bool(allow_cpu, "allow_cpu"):
        print(NO_CUDA, file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda:0" if cuda else "cpu")
    size = "paper" if cuda else "tiny"
    results = {"machine": machine(device), "command": " ".join(sys.argv)}
    print_table("machine", {k: str(v) for k, v in results["machine"].items()})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        sections = {
            "train_step": lambda: train_steps(device, size, steps if cuda else 1),
            "epoch": lambda: epoch(device, size, workdir, cases if cuda else 12),
            "inference": lambda: inference(device, size, workdir, 6 if cuda else 2),
            "configs": lambda: config_checks(device, workdir),
        }
        for name, section in sections.items():
            try:
                results[name] = section()
            except Exception:  # one section's failure is a finding; the others still run
                results[name] = {"error": traceback.format_exc()[-3000:]}
            print_table(name, results[name])
    results["total_s"] = time.perf_counter() - start
    print(f"\ntotal {results['total_s']:.0f} s")
    write_atomically(output, lambda f: f.write((json.dumps(results, indent=4) + "\n").encode()))
    print(f"written {output}")


if __name__ == "__main__":
    run(main)
