"""Speed and memory of training and inference on this machine, against the hardware's practical ceiling.

    python benchmarks/run.py --repeats 3 --output benchmarks/results.json   # demo and paper size, ~30 min on 2 cores
    python benchmarks/run.py --sizes "['demo']"                             # demo size only, ~6 min
    python benchmarks/run.py --sizes "['paper']" --training false --scaling false --fidelity false  # runtimes only

Each section prints a table and everything lands in one JSON file. ``precision`` is ``fp32`` or ``bf16``:
bfloat16 as the bundle runs it on a CPU (``amp``: ``torch.autocast("cpu", torch.bfloat16)`` around the forward,
scripts/engine/inferers.py), each figure against the ceiling of its own precision.
- ``machine``: CPU, its AMX / AVX512-BF16 / AVX512 / AVX2 flags, torch, OpenVINO, whether the CPU has native
  bfloat16, and the oneDNN kernels (ISA) a float32 and a bfloat16 conv3d run on (from ``ONEDNN_VERBOSE``);
- ``ceiling``: GFLOP/s of one large ``conv3d`` forward (the practical ceiling of the convolution kernels), float32,
  bfloat16 under autocast and with bfloat16 weights, both memory formats;
- ``networks``: one training step (forward, Jaccard loss, backward, Adam) of the modified UNet, the classic
  baseline (BasicUNet) and MONAI's UNet on tensors already in memory, FLOPs counted with torch's
  ``FlopCounterMode``, as GFLOP/s and as a ratio to the ceiling, in both memory formats and both precisions;
- ``training_precision`` (where bfloat16 is timed): the modified UNet's step in float32 and bfloat16, alternating;
- ``compile`` (demo size): the modified UNet's step under ``torch.compile``, with the time the first step took;
- ``pipeline``: the time per batch of the real CacheDataset + random transforms of configs/train.json through
  DataLoader (num_workers 0, 1, 2) and ThreadDataLoader, alone and (demo size) feeding the training step, and the
  share the data pipeline adds to the step on in-memory tensors (at the paper size, where one step takes half a
  minute here, the share is estimated as loader time / step time);
- ``inference``: the runtimes a user could pick, alternating in one run: the bare forward of the network in torch
  float32 and bfloat16, and of its ONNX export (``torch.onnx.export``) in ONNX Runtime and OpenVINO (float32, and
  bfloat16 where native); and whole-case inference through configs/inference.json (load 5 maps, pre-process,
  predict, invert, save mask, overlay and row) per case once the workflow runs and per run with its start-up, in each
  ``inference_backend`` and precision and as the bundle runs by default, against the fastest peer's bare forward,
  with every variant's masks against torch float32's (Dice, volume);
- ``fidelity``: masks and lesion volumes of bfloat16 inference as the bundle runs it by default (OpenVINO where
  installed) against torch float32 on synthetic testing cases: at the
  demo size with the demo model trained here (and the best validation Dice of a float32 and a bfloat16 training
  run of the demo, same seed), at the paper size with an untrained network (no trained weights exist at that size);
- ``scaling``: step time and peak memory against batch size and spatial size, demo and paper features;
- ``isles24`` (``--isles24 true``): on full-size synthetic ISLES 2024 cases (512 x 512 x 100 at about 0.45 x 0.45 x
  2 mm), whole-case inference per case and its peak memory with configs/isles24.json (resize to 128 x 128 x 64) and
  configs/isles24_native.json (0.8 x 0.8 x 2 mm, sliding 96 x 96 x 32 windows), each in its own process, and the
  training step each profile takes (batch 2 of whole resized volumes; batch 2 x 2 patches), at the demo's features;
- ``pacs`` (``--pacs true``): per study, ``scripts.tools.pacs segment`` on a real Orthanc (pull over DICOMweb,
  inference with configs/dicom.json, SEG and SR stored back and read back) against whole-case NIfTI inference of the
  same case, both with their start-up, alternating, shortest and median; and the listener's time per study;
  full-size synthetic ISLES 2018 cases, demo features;
- peak resident memory of each section, each measured in its own child process.
Not part of the tests: timings are never asserted.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from scripts.data.datalist import load_fold  # noqa: E402
from scripts.engine.backends import (  # noqa: E402
    OPENVINO_PRECISIONS,
    choose_backend,
    openvino_version,
    signal_stack_kept,
)
from scripts.engine.inferers import amp_default, cpu_has_native_bf16  # noqa: E402
from scripts.engine.networks import ModifiedUNet  # noqa: E402
from scripts.flags import as_bool  # noqa: E402
from scripts.safe_files import write_atomically  # noqa: E402
from scripts.synthetic.demo import network_settings  # noqa: E402
from scripts.synthetic.isles import generate, generate_isles24  # noqa: E402
from scripts.tools.cli import run  # noqa: E402
from scripts.tools.prepare_datalist import main as write_datalist  # noqa: E402

DEMO = network_settings()
SIZES = {  # name: (batch, features, spatial_size); "tiny": the CPU check of benchmarks/gpu.py (tests/test_backends.py)
    "demo": (2, DEMO["features"], DEMO["spatial_size"]),
    "paper": (2, [64, 128, 256, 512, 1024], [128, 128, 32]),
    "tiny": (2, [2, 4, 8, 16, 32], [32, 32, 16]),
}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
PRECISIONS = ("fp32", "bf16")


def autocast(precision):
    """The context the bundle runs the network in: bfloat16 autocast on the CPU for ``bf16``, nothing for ``fp32``."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def timed(fn, repeats, warmup=1):
    """Shortest wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls: what the code does when nothing
    else interferes (on a shared machine, medians of the same run moved by up to 1.5x between runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mib():
    """Peak resident memory of this process in MiB. Linux's VmHWM starts afresh at exec, unlike getrusage's
    ru_maxrss, which a child process inherits from the parent it was forked from."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def networks(features):
    from monai.networks.nets import BasicUNet, UNet

    return {
        "modified": ModifiedUNet(features=features),
        "classic (BasicUNet)": BasicUNet(
            3, 5, 2, features=list(features) + [features[0]], act="relu", norm="batch", dropout=0.0, upsample="deconv"
        ),
        "monai UNet": UNet(
            3, 5, 2, channels=features, strides=[2] * (len(features) - 1), num_res_units=2, norm="instance"
        ),
    }


def make_step(net, memory_format, precision="fp32"):
    """One training step of ``net`` on a batch dict, the loss and optimizer of configs/train.json; with ``bf16`` the
    forward runs under autocast and the loss on its float32 output, as scripts/monai_gaps.py's CpuAutocastInferer.
    """
    from monai.losses import DiceLoss

    net = net.to(memory_format=memory_format).train()
    loss_fn = DiceLoss(jaccard=True, include_background=False, to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, weight_decay=1e-3)

    def step(image, label):
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision):
            logits = net(image.to(memory_format=memory_format))
        loss = loss_fn(logits.float(), label)
        loss.backward()
        optimizer.step()

    return step


def batch(size, spatial):
    image = torch.randn(size, 5, *spatial)
    label = (torch.rand(size, 1, *spatial) > 0.97).float()
    return image, label


def step_flops(net, image, label):
    step = make_step(net, torch.contiguous_format)
    with FlopCounterMode(display=False) as counter:
        step(image, label)
    return counter.get_total_flops()


def conv3d_gflops(channels, spatial, memory_format, repeats, backward=False, precision="fp32"):
    """GFLOP/s of a ``channels`` -> ``channels`` 3x3x3 conv3d on [2, channels, *spatial], forward or forward+backward;
    ``precision`` ``fp32``, ``bf16`` (autocast, as the bundle runs) or ``bf16_weights`` (weights and input cast)."""
    dtype = torch.bfloat16 if precision == "bf16_weights" else torch.float32
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(dtype=dtype, memory_format=memory_format)
    x = torch.randn(2, channels, *spatial, dtype=dtype).to(memory_format=memory_format).requires_grad_(backward)
    flops = 2 * channels * channels * 27 * x[:, :1].numel() * (3 if backward else 1)

    def run():
        with autocast(precision):
            if backward:
                conv(x).float().sum().backward()
            else:
                with torch.no_grad():
                    conv(x)

    return flops / timed(run, repeats) / 1e9


def measured_precisions(bf16):
    """The precisions to time: ``fp32``, and ``bf16`` where the CPU computes it in hardware (``bf16="auto"``, as
    scripts/engine/inferers.py detects it) or when asked (``"true"``). Emulated, one demo-size bfloat16 conv3d takes
    minutes, so ``auto`` leaves it out there."""
    wanted = cpu_has_native_bf16() if str(bf16).strip().lower() == "auto" else as_bool(bf16, "bf16")
    return PRECISIONS if wanted else ("fp32",)


def section_ceiling(spatial, repeats, precisions=PRECISIONS):
    """The practical ceiling of each precision: GFLOP/s of a 64->64 channel conv3d forward on [2, 64, *spatial], in
    both memory formats (bfloat16 under autocast and with bfloat16 weights: ``best["bf16"]`` is the faster); and, to
    show what narrow layers can reach, channels_last_3d forward+backward at 8 to 64 channels."""
    variants = [*precisions, "bf16_weights"] if "bf16" in precisions else list(precisions)
    out = {
        precision: {
            name: conv3d_gflops(64, spatial, fmt, repeats, precision=precision) for name, fmt in MEMORY_FORMATS.items()
        }
        for precision in variants
    }
    best = {"fp32": max(out["fp32"].values())}
    if "bf16" in precisions:
        best["bf16"] = max(*out["bf16"].values(), *out["bf16_weights"].values())
    narrow = {
        precision: {
            c: conv3d_gflops(c, spatial, torch.channels_last_3d, repeats, backward=True, precision=precision)
            for c in (8, 16, 32, 64)
        }
        for precision in precisions
    }
    return {"gflops": out, "best": best, "channels_last_3d_forward_backward_gflops_by_channels": narrow}


def onednn_kernels():
    """The oneDNN implementation (its ISA) that a float32 and a bfloat16-autocast channels_last_3d conv3d forward run
    on, from ``ONEDNN_VERBOSE=1`` in a child process each; and what the CPU says it has."""
    kernels = {}
    for precision in PRECISIONS:
        code = (
            "import torch; c = torch.nn.Conv3d(64, 64, 3, padding=1).to(memory_format=torch.channels_last_3d)\n"
            "x = torch.randn(1, 64, 16, 16, 8).to(memory_format=torch.channels_last_3d)\n"
            f"with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled={precision == 'bf16'}): c(x)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "ONEDNN_VERBOSE": "1"}
        ).stdout
        lines = [line.split(",") for line in out.splitlines() if ",exec,cpu,convolution," in line]
        kernels[precision] = sorted({fields[fields.index("convolution") + 1] for fields in lines})
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "native_bf16": cpu_has_native_bf16(),
        "openvino": openvino_version(),
        "onednn_conv3d_kernels": kernels,
    }


def section_networks(size, repeats, ceiling):
    """Training steps of each network, memory format and precision; ``ceiling`` maps each precision to time to its
    GFLOP/s."""
    bs, features, spatial = SIZES[size]
    image, label = batch(bs, spatial)
    rows = []
    for name, net in networks(features).items():
        flops = step_flops(net, image, label)
        for fmt_name, fmt in MEMORY_FORMATS.items():
            for precision in ceiling:
                step = make_step(net, fmt, precision)
                seconds = timed(lambda: step(image, label), repeats)
                rows.append(
                    {
                        "network": name,
                        "memory_format": fmt_name,
                        "precision": precision,
                        "step_s": seconds,
                        "gflop": flops / 1e9,
                        "gflops": flops / seconds / 1e9,
                        "of_ceiling": flops / seconds / 1e9 / ceiling[precision],
                    }
                )
    return rows


def section_training_precision(size, rounds):
    """The modified UNet's training step (channels_last_3d, as configs/train.json runs it) in float32 and in bfloat16
    (autocast, ``--amp true``), rounds alternating between the two after a warm-up round."""
    bs, features, spatial = SIZES[size]
    image, label = batch(bs, spatial)
    net = ModifiedUNet(features=features)
    steps = {precision: make_step(net, torch.channels_last_3d, precision) for precision in PRECISIONS}
    timings = alternating({p: lambda step=step: step(image, label) for p, step in steps.items()}, rounds)
    return {p: {"step_s": fastest, "median_s": median} for p, (fastest, median) in timings.items()}


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The flags of the matrix and vector units that decide the fastest precision: AMX, AVX512-BF16, AVX512, AVX2."""
    wanted = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return {}
    return {flag: flag in flags for flag in wanted}


def section_compile(size, repeats, ceiling):
    """The modified UNet's step with the network under ``torch.compile`` (inductor), channels_last_3d."""
    bs, features, spatial = SIZES[size]
    image, label = batch(bs, spatial)
    net = ModifiedUNet(features=features)
    flops = step_flops(net, image, label)
    torch._inductor.config.force_disable_caches = True  # time a real compile, not a cache hit of an earlier run
    step = make_step(torch.compile(net.to(memory_format=torch.channels_last_3d)), torch.channels_last_3d)
    start = time.perf_counter()
    step(image, label)  # compiles
    compile_s = time.perf_counter() - start
    seconds = timed(lambda: step(image, label), repeats)
    return {
        "network": "modified",
        "memory_format": "channels_last_3d",
        "compile_s": compile_s,
        "step_s": seconds,
        "gflops": flops / seconds / 1e9,
        "of_ceiling": flops / seconds / 1e9 / ceiling["fp32"],
    }


def synthetic_datalist(workdir, num_cases, folds=2):
    root = os.path.join(workdir, "isles")
    generate(root, num_train=num_cases, num_test=2, seed=0)
    path = os.path.join(workdir, "datalist.json")
    write_datalist(root, path, folds=folds, seed=0)
    return root, path, load_fold(path, root, 0)


def train_parser(size, root, datalist_path, **override):
    from monai.bundle import ConfigParser

    bs, features, spatial = SIZES[size]
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO_ROOT, "configs", "train.json"))
    parser.update(
        {
            "bundle_root": tempfile.mkdtemp(dir=os.path.dirname(root)),  # in the workdir, removed with it
            "dataset_dir": root,
            "data_list_file_path": datalist_path,
            "features": features,
            "spatial_size": spatial,
            "batch_size": bs,
            "check_inputs": False,
            **override,
        }
    )
    return parser


def section_pipeline(size, repeats, workdir, with_steps):
    """Time per batch of the training data pipeline alone and, if ``with_steps``, feeding the training step.

    The in-memory reference steps over batches taken from the same loader beforehand (the same tensors, no
    pipeline). Rounds alternate between the reference and every loader, so a slow spell of a shared machine hits
    them alike; each figure is the fastest round after a warm-up round. 24 synthetic cases (12 for training) give
    6 batches per round: with a rotation drawn for half the samples, fewer batches make a round's cost a lottery.
    """
    from monai.data import DataLoader, ThreadDataLoader

    bs, features, spatial = SIZES[size]
    root, path, _ = synthetic_datalist(workdir, num_cases=24)
    parser = train_parser(size, root, path, num_workers=0)
    dataset = parser.get_parsed_content("train#dataset")
    loaders = {
        f"DataLoader num_workers={n}": DataLoader(
            dataset, batch_size=bs, shuffle=True, num_workers=n, persistent_workers=n > 0
        )
        for n in (0, 1, 2)
    }
    loaders["ThreadDataLoader"] = ThreadDataLoader(dataset, batch_size=bs, shuffle=True, num_workers=0)
    if with_steps:
        fmt = MEMORY_FORMATS["channels_last_3d" if parser.get_parsed_content("channels_last") else "contiguous"]
        step = make_step(parser.get_parsed_content("network_def"), fmt)  # as configs/train.json builds it
        loaders = {"tensors in memory": list(loaders["DataLoader num_workers=0"]), **loaders}

    def per_batch(batches, train):
        start = time.perf_counter()
        for data in batches:
            if train:
                step(data["image"], data["label"])
        return (time.perf_counter() - start) / len(batches)

    rounds = {name: {"loader_s": [], "step_s": []} for name in loaders}
    for _ in range(repeats + 1):  # the first round warms up
        for name, batches in loaders.items():
            rounds[name]["loader_s"].append(per_batch(batches, False))
            if with_steps:
                rounds[name]["step_s"].append(per_batch(batches, True))
    rows = [
        {"loader": name, **{key: min(times[1:]) for key, times in row.items() if times}} for name, row in rounds.items()
    ]
    if with_steps:
        bare = rows[0]["step_s"]
        for row in rows:
            row["pipeline_share"] = row["step_s"] / bare - 1
    return rows


def forward_flops(net, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return counter.get_total_flops()


def inference_bundle(size, workdir, cases, seed=1, dicom=False):
    """Synthetic testing cases (``dicom``: also as DICOM studies) and a bundle root whose models/model.pt is an
    untrained network of ``size``."""
    root = os.path.join(workdir, f"isles_inference_{seed}")
    generate(root, num_train=0, num_test=cases, seed=seed, dicom=dicom)
    bundle_root = tempfile.mkdtemp(dir=workdir)
    os.makedirs(os.path.join(bundle_root, "models"))
    torch.manual_seed(seed)
    torch.save(ModifiedUNet(features=SIZES[size][1]).state_dict(), os.path.join(bundle_root, "models", "model.pt"))
    return root, bundle_root


def inference_workflow(size, bundle_root, dataset_dir, workdir, **override):
    """configs/inference.json at ``size``; OpenVINO's converted networks cached in ``workdir`` (the first run of a
    network converts it, later ones read it), not in the user's cache folder."""
    from monai.bundle import ConfigWorkflow

    _, features, spatial = SIZES[size]
    override = {"openvino_cache_dir": os.path.join(workdir, "openvino_cache"), **override}
    return ConfigWorkflow(
        config_file=os.path.join(REPO_ROOT, "configs", "inference.json"),
        workflow_type="infer",
        meta_file=os.path.join(REPO_ROOT, "configs", "metadata.json"),
        bundle_root=bundle_root,
        dataset_dir=dataset_dir,
        features=features,
        spatial_size=spatial,
        output_dir=tempfile.mkdtemp(dir=workdir),
        **override,
    )


def onnx_file(net, x, workdir):
    """``net`` exported to ONNX by ``torch.onnx.export``, as a user who takes the model to another runtime does."""
    path = os.path.join(workdir, "model.onnx")
    torch.onnx.export(net, (x,), path, input_names=["image"], output_names=["pred"], dynamo=True, verbose=False)
    return path


def peer_runtimes(net, x, precisions, workdir):
    """The bare forward of ``net`` on ``x`` in each runtime a user could pick, as callables: torch float32 and
    bfloat16 (autocast, the bundle's torch path), and the ONNX export in ONNX Runtime (float32: its CPU provider has
    no bfloat16 convolution) and in OpenVINO (float32, and bfloat16 where native); a runtime not installed is left
    out (benchmarks/requirements.txt installs them)."""
    peers = {}
    for precision in precisions:
        peers[f"torch {precision}"] = lambda precision=precision: forward_in(net, x, precision)
    path = onnx_file(net, x, workdir)
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        peers["onnxruntime fp32"] = lambda: session.run(None, {"image": x.numpy()})
    except ImportError:
        pass
    if openvino_version() is not None:
        import openvino

        for precision in precisions:
            with signal_stack_kept():  # a Core per precision, freed in any order (scripts/engine/backends.py)
                compiled = openvino.Core().compile_model(
                    path, "CPU", {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision == "bf16"]}
                )
            peers[f"openvino {precision}"] = lambda compiled=compiled: compiled({0: x.numpy()})
    return peers


def forward_in(net, x, precision):
    with torch.no_grad(), autocast(precision):
        return net(x.to(memory_format=torch.channels_last_3d))


def alternating(calls, rounds):
    """Each of ``calls`` (name: callable) timed once per round, rounds alternating between them after one warm-up
    round, so that a slow spell of a shared machine hits them alike; the fastest and the median of each."""
    times = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: (min(t), float(np.median(t))) for name, t in times.items()}


# whole-case inference variants: (backend, amp); ``auto`` with the ``amp`` default is what a user gets
WHOLE_CASE = {
    "bundle default": ("auto", None),
    "torch fp32": ("torch", False),
    "torch bf16": ("torch", True),
    "openvino fp32": ("openvino", False),
    "openvino bf16": ("openvino", True),
}


def whole_case_run(size, bundle_root, root, workdir, backend, amp, cases, **override):
    """One configs/inference.json run on ``cases`` testing cases: seconds per case from the second case to the last
    (the workflow running), and for the whole run with its start-up; its masks and their voxel volumes. ``amp`` None:
    the config's default."""
    from ignite.engine import Events

    override = {"inference_backend": backend, **override, **({} if amp is None else {"amp": amp})}
    start = time.perf_counter()
    wf = inference_workflow(size, bundle_root, root, workdir, **override)
    wf.initialize()
    done = []
    wf.parser.get_parsed_content("evaluator").add_event_handler(
        Events.ITERATION_COMPLETED, lambda: done.append(time.perf_counter())
    )
    wf.run()
    wf.finalize()
    run_s = (time.perf_counter() - start) / cases
    masks = read_masks(os.path.join(wf.parser.get_parsed_content("prediction_dir"), "masks"))
    return (done[-1] - done[0]) / (len(done) - 1), run_s, masks


def section_inference(size, repeats, workdir, precisions, ceiling, cases=6):
    """The bare forward of the network in each peer runtime (``peer_runtimes``), and whole-case inference through
    configs/inference.json (load 5 maps, pre-process, predict, ``Invertd``, save mask, overlay and row) in each
    ``backend`` and precision and as the bundle runs by default, per case and per run (the fastest run, and the first:
    the one where OpenVINO converts the network, which later runs read from the cache folder); each against the
    fastest peer's bare forward, and masks against torch float32's. Rounds alternate between the variants."""
    _, features, spatial = SIZES[size]
    root, bundle_root = inference_bundle(size, workdir, cases)
    torch.manual_seed(1)
    net = ModifiedUNet(features=features)
    net.load_state_dict(torch.load(os.path.join(bundle_root, "models", "model.pt")))
    net = net.eval().to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 5, *spatial)
    peers = alternating(peer_runtimes(net, x, precisions, workdir), repeats)
    flops = forward_flops(net, x)
    rows = [
        {
            "kind": "bare forward",
            "runtime": name,
            "per_case_s": fastest,
            "median_s": median,
            "of_ceiling": flops / fastest / 1e9 / ceiling[name.split()[-1]] if ceiling else None,
        }
        for name, (fastest, median) in peers.items()
    ]
    best_peer = min(peers, key=lambda name: peers[name][0])
    amp = amp_default()
    default_runtime = f"{choose_backend('auto', amp, 'cpu', cpu_has_native_bf16())[0]} {'bf16' if amp else 'fp32'}"
    variants = {
        name: (backend, amp)
        for name, (backend, amp) in WHOLE_CASE.items()
        if (amp is not True or "bf16" in precisions) and (backend != "openvino" or openvino_version() is not None)
    }
    if default_runtime in variants:  # the default is one of the variants: the same run, timed once
        del variants["bundle default"]
    runs = {name: [] for name in variants}
    masks = {}
    for _ in range(repeats):
        for name, (backend, amp) in variants.items():
            per_case, run_s, masks[name] = whole_case_run(size, bundle_root, root, workdir, backend, amp, cases)
            runs[name].append((per_case, run_s))
    reference, voxel_ml = masks["torch fp32"]
    for name, timings in runs.items():
        per_case, run_s = min(t[0] for t in timings), min(t[1] for t in timings)
        agreement = mask_agreement(reference, masks[name][0], voxel_ml)
        own = peers.get(default_runtime if name == "bundle default" else name, (None,))[0]
        rows.append(
            {
                "kind": "whole case",
                "runtime": name if name != "bundle default" else f"bundle default ({default_runtime})",
                "per_case_s": per_case,
                "median_s": float(np.median([t[0] for t in timings])),
                "of_own_forward": per_case / own if own else None,
                "of_fastest_peer": per_case / peers[best_peer][0],
                "run_per_case_s": run_s,
                "run_of_fastest_peer": run_s / peers[best_peer][0],
                "first_run_per_case_s": timings[0][1],
                "min_dice_vs_torch_fp32": min(row["dice"] for row in agreement),
                "max_volume_diff_vs_torch_fp32": max(row["volume_rel_diff"] for row in agreement),
            }
        )
    if "bundle default" not in variants:
        rows.append({**next(r for r in rows if r["runtime"] == default_runtime and r["kind"] == "whole case")})
        rows[-1]["runtime"] = f"bundle default ({default_runtime})"
    return {"rows": rows, "fastest_peer": best_peer, "default_runtime": default_runtime, "cases": cases}


def mask_agreement(masks_a, masks_b, spacing_ml):
    """Per case: Dice between two masks (1 when both are empty) and the relative lesion-volume difference of
    ``masks_b`` from ``masks_a`` (the float32 ones)."""
    rows = []
    for case in sorted(masks_a):
        a, b = masks_a[case], masks_b[case]
        dice = 1.0 if not (a.any() or b.any()) else 2 * (a & b).sum() / (a.sum() + b.sum())
        vol_a, vol_b = a.sum() * spacing_ml[case], b.sum() * spacing_ml[case]
        rows.append(
            {
                "case": case,
                "dice": float(dice),
                "volume_fp32_ml": float(vol_a),
                "volume_bf16_ml": float(vol_b),
                "volume_rel_diff": float(abs(vol_b - vol_a) / vol_a) if vol_a else float(vol_b > 0),
            }
        )
    return rows


def read_masks(mask_dir):
    """The masks a run wrote in ``mask_dir`` (as booleans) and each one's voxel volume in mL, by file name."""
    import nibabel as nib

    masks, voxel_ml = {}, {}
    for name in sorted(os.listdir(mask_dir)):
        img = nib.load(os.path.join(mask_dir, name))
        masks[name], voxel_ml[name] = np.asanyarray(img.dataobj) > 0, float(np.prod(img.header.get_zooms()[:3])) / 1000
    return masks, voxel_ml


def predicted_masks(size, bundle_root, dataset_dir, workdir, amp, **override):
    wf = inference_workflow(size, bundle_root, dataset_dir, workdir, amp=amp, num_workers=0, **override)
    wf.initialize()
    wf.run()
    return read_masks(os.path.join(wf.parser.get_parsed_content("prediction_dir"), "masks"))


def demo_training(workdir, amp):
    """The demo (train.json + demo.json) trained in ``workdir``; its best validation Dice and its bundle root."""
    from monai.bundle import ConfigWorkflow

    bundle_root = os.path.join(workdir, f"demo_amp_{amp}")
    wf = ConfigWorkflow(
        config_file=[os.path.join(REPO_ROOT, "configs", name) for name in ("train.json", "demo.json")],
        workflow_type="train",
        meta_file=os.path.join(REPO_ROOT, "configs", "metadata.json"),
        bundle_root=bundle_root,
        amp=amp,
    )
    wf.initialize()
    wf.run()
    best = wf.parser.get_parsed_content("validate#evaluator").state.best_metric
    wf.finalize()
    return best, bundle_root


def section_fidelity(size, workdir):
    """bfloat16 inference as the bundle runs it (``backend`` ``auto``: OpenVINO where installed) against torch
    float32: masks and volumes per synthetic testing case. At the demo size with the
    demo model trained here in float32 (and the demo trained in bfloat16 too, same seed: both best validation Dice),
    at the paper size with an untrained network."""
    out = {}
    if size == "demo":
        dice = {}
        for amp in (False, True):
            dice["bf16" if amp else "fp32"], bundle_root = demo_training(workdir, amp)
            if not amp:
                fp32_root = bundle_root
        out["demo_training_best_val_dice"] = dice
        dataset_dir = os.path.join(fp32_root, "demo_data", "isles")
        settings = {"ckpt_dir": os.path.join(fp32_root, "demo_data", "models")}
        out["model"] = "the demo model trained above (float32)"
    else:
        dataset_dir, fp32_root = inference_bundle(size, workdir, cases=4, seed=2)
        settings = {}
        out["model"] = "untrained network (no trained weights exist at this size)"
    fp32, spacing = predicted_masks(
        size, fp32_root, dataset_dir, workdir, amp=False, inference_backend="torch", **settings
    )
    bf16, _ = predicted_masks(size, fp32_root, dataset_dir, workdir, amp=True, inference_backend="auto", **settings)
    out["cases"] = mask_agreement(fp32, bf16, spacing)
    return out


# profile: (config file, the training batch it gives: volumes or patches, their size)
ISLES24_PROFILES = {"resize": ("isles24.json", 2, [128, 128, 64]), "native": ("isles24_native.json", 4, [96, 96, 32])}


def section_isles24(cases, repeats):
    """Whole-case inference and the training step of each ISLES 2024 profile, each in its own process."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        root = os.path.join(workdir, "isles24")
        generate_isles24(root, num_train=0, num_test=cases, seed=1)
        for name, (config, batch_size, spatial) in ISLES24_PROFILES.items():
            infer = run_child("isles24_inference", {"config": config, "dataset_dir": root, "cases": cases})
            step = run_child(
                "scaling_point",
                {"features": SIZES["demo"][1], "batch": batch_size, "spatial": spatial, "repeats": repeats},
            )
            rows.append(
                {
                    "profile": f"{name} ({config})",
                    "per_case_s": infer["per_case_s"],
                    "inference_peak_rss_mib": infer["peak_rss_mib"],
                    "train_batch": f"{batch_size} x {spatial}",
                    "train_step_s": step["step_s"],
                    "train_step_peak_rss_mib": step["peak_rss_mib"],
                }
            )
    return rows


def isles24_inference(config, dataset_dir, cases):
    """Seconds per case of configs/inference.json + ``config`` on ``dataset_dir`` (an untrained network of the
    demo's features), the first case left out (start-up), and the peak RSS."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    with tempfile.TemporaryDirectory() as bundle_root:
        os.makedirs(os.path.join(bundle_root, "models"))
        torch.manual_seed(0)
        net = ModifiedUNet(features=SIZES["demo"][1])
        torch.save(net.state_dict(), os.path.join(bundle_root, "models", "model.pt"))
        wf = ConfigWorkflow(
            config_file=[os.path.join(REPO_ROOT, "configs", name) for name in ("inference.json", config)],
            workflow_type="infer",
            meta_file=os.path.join(REPO_ROOT, "configs", "metadata.json"),
            bundle_root=bundle_root,
            dataset_dir=dataset_dir,
            features=SIZES["demo"][1],
            amp=False,
        )
        wf.initialize()
        done = [time.perf_counter()]
        wf.parser.get_parsed_content("evaluator").add_event_handler(
            Events.ITERATION_COMPLETED, lambda: done.append(time.perf_counter())
        )
        wf.run()
        wf.finalize()
    per_case = (done[-1] - done[1]) / (len(done) - 2) if cases > 1 else done[-1] - done[0]
    return {"per_case_s": per_case, "peak_rss_mib": peak_rss_mib()}


def section_pacs(cases, repeats):
    """Per study: ``scripts.tools.pacs segment``'s work (QIDO-RS, WADO-RS of the series, inference with
    configs/dicom.json, SEG and SR written, stored by STOW-RS and read back) on a real Orthanc (tests/orthanc.py),
    against whole-case NIfTI inference of the same case (configs/inference.json on its case folder), each with its
    start-up, ``repeats`` times each, the two alternating (NIfTI, PACS, NIfTI, ...), so that the machine's load
    weighs on both alike: the shortest and the median of each and their ratios; then the listener segmenting every
    stored study (``--until_idle``), per study. An untrained network of the demo's features on full-size synthetic
    ISLES 2018 cases."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
    from orthanc import orthanc_available, start_orthanc, upload
    from scripts.data.channels import NCCT
    from scripts.dicom.dicomweb import ListenerState, Pacs
    from scripts.dicom.series import find_studies
    from scripts.tools.pacs import StudySegmenter, config_files, listen

    available, reason = orthanc_available()
    if not available:
        return [{"skipped": reason}]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        root, bundle_root = inference_bundle("demo", workdir, cases, dicom=True)
        settings = os.path.join(workdir, "demo_network.json")
        with open(settings, "w") as f:
            json.dump({"features": SIZES["demo"][1], "spatial_size": SIZES["demo"][2], "amp": False}, f)
        with start_orthanc(os.path.join(workdir, "orthanc")) as orthanc:
            pacs = Pacs(orthanc.dicomweb_url, orthanc.auth, orthanc.url)
            segmenter = StudySegmenter(pacs, os.path.join(workdir, "pacs"), bundle_root, config_files(settings))
            for case in sorted(os.listdir(os.path.join(root, "dicom", "TESTING"))):
                study_dir = os.path.join(root, "dicom", "TESTING", case)
                upload(orthanc, [os.path.join(d, n) for d, _, names in os.walk(study_dir) for n in names])
                (study,) = find_studies(study_dir, segmenter.rules)

                def nifti_inference(case=case):
                    # the PACS run's settings (float32 torch), so that the two differ by the PACS round trip only
                    wf = inference_workflow(
                        "demo", bundle_root, os.path.join(root, "TESTING", case), workdir, amp=False
                    )
                    wf.initialize()
                    wf.run()
                    wf.finalize()

                def pacs_segment(study=study):
                    segmenter(study.uid, segmenter.inputs(study.uid), True)

                times = {"nifti": [], "pacs": []}
                for _ in range(repeats):
                    for name, work in (("nifti", nifti_inference), ("pacs", pacs_segment)):
                        start = time.perf_counter()
                        work()
                        times[name].append(time.perf_counter() - start)
                nifti, segment = (np.asarray(times[name]) for name in ("nifti", "pacs"))
                rows.append(
                    {
                        "case": case,
                        "slices": len(study.series[NCCT].sources),
                        "nifti_min_s": float(nifti.min()),
                        "pacs_min_s": float(segment.min()),
                        "ratio_of_min": float(segment.min() / nifti.min()),
                        "nifti_median_s": float(np.median(nifti)),
                        "pacs_median_s": float(np.median(segment)),
                        "ratio_of_median": float(np.median(segment) / np.median(nifti)),
                    }
                )
            time.sleep(2)  # every study stable (StableAge 1 s): its StableStudy event is in the feed
            state = ListenerState(os.path.join(workdir, "listener.json"))
            listener = threading.Thread(target=listen, args=(segmenter, state, 0.2, True))
            start = time.perf_counter()
            listener.start()
            while sum(study["outcome"] == "stored" for study in list(state.studies.values())) < cases:
                time.sleep(0.01)
            per_study = (time.perf_counter() - start) / cases  # the feed read to the last SEG and SR stored
            listener.join()  # it returns once its own results' StableStudy events are handled (skipped)
    rows.append({**dict.fromkeys(rows[0], ""), "case": "listener, per study", "pacs_min_s": per_study})
    return rows


def section_scaling(points, repeats):
    """Training step time and peak RSS at each ``(features, batch, spatial)`` point, each in its own process."""
    return [
        run_child("scaling_point", {"features": f, "batch": b, "spatial": s, "repeats": repeats}) for f, b, s in points
    ]


def scaling_point(features, batch_size, spatial, repeats):
    image, label = batch(batch_size, spatial)
    step = make_step(ModifiedUNet(features=features), torch.channels_last_3d)
    before = peak_rss_mib()
    seconds = timed(lambda: step(image, label), repeats)
    return {
        "features": features,
        "batch": batch_size,
        "spatial": spatial,
        "step_s": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "rss_growth_mib": peak_rss_mib() - before,
    }


def run_child(section, kwargs):
    """Run one section in a fresh process so its peak RSS is its own; its stderr is this process's, with Python's
    fault handler on, so a child that crashes shows where."""
    code = (
        f"import json, sys; sys.path.insert(0, {REPO_ROOT!r}); from benchmarks.run import child; "
        f"print('@@' + json.dumps(child({section!r}, {json.dumps(kwargs)!r})))"
    )
    command = [sys.executable, "-X", "faulthandler", "-c", code]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.rsplit("@@", 1)[1])


def child(section, kwargs_json):
    kwargs = json.loads(kwargs_json)
    if section == "scaling_point":
        return scaling_point(kwargs["features"], kwargs["batch"], kwargs["spatial"], kwargs["repeats"])
    if section == "pacs":
        return {"rows": section_pacs(kwargs["cases"], kwargs["repeats"]), "peak_rss_mib": peak_rss_mib()}
    if section == "isles24_inference":
        return isles24_inference(kwargs["config"], kwargs["dataset_dir"], kwargs["cases"])
    with tempfile.TemporaryDirectory() as workdir:
        if section == "pipeline":
            result = {"rows": section_pipeline(kwargs["size"], kwargs["repeats"], workdir, kwargs["with_steps"])}
        elif section == "fidelity":
            return section_fidelity(kwargs["size"], workdir)
        else:
            result = section_inference(
                kwargs["size"], kwargs["repeats"], workdir, kwargs["precisions"], kwargs["ceiling"], kwargs["cases"]
            )
    return {**result, "peak_rss_mib": peak_rss_mib()}


def print_table(title, rows):
    print(f"\n## {title}")
    rows = rows if isinstance(rows, list) else [rows]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


def section_training(size, reps, repeats, ceiling, precisions, with_networks=True):
    """The training sections of one size: ``training_precision`` (where bfloat16 is timed) and, ``with_networks``,
    ``networks``, ``compile`` (demo size) and ``pipeline``; each printed as it ends."""
    bs, features, spatial = SIZES[size]
    section = {}
    if "bf16" in precisions:
        section["training_precision"] = section_training_precision(size, max(2, reps))
        print_table(
            f"{size}: modified UNet training step, fp32 and bf16 alternating",
            [{"precision": p, **row} for p, row in section["training_precision"].items()],
        )
    if not with_networks:
        return section
    nets = section_networks(size, reps, ceiling["best"])
    print_table(f"{size}: training step, batch {bs}, features {features}, input {spatial}", nets)
    section["networks"] = nets
    demo = size == "demo"
    if demo:  # compiling the paper-size network takes too long on a CPU to be worth a row
        section["compile"] = section_compile(size, reps, ceiling["best"])
        print_table(f"{size}: training step with torch.compile", section["compile"])
    section["pipeline"] = run_child("pipeline", {"size": size, "repeats": repeats, "with_steps": demo})
    if not demo:  # one step here takes tens of seconds: the share is the loader's time over the step's
        step = next(
            r["step_s"]
            for r in nets
            if r["network"] == "modified" and r["memory_format"] == "channels_last_3d" and r["precision"] == "fp32"
        )
        for row in section["pipeline"]["rows"]:
            row["pipeline_share_estimate"] = row["loader_s"] / step
    print_table(
        f"{size}: data pipeline per batch (peak RSS {section['pipeline']['peak_rss_mib']:.0f} MiB)",
        section["pipeline"]["rows"],
    )
    return section


def targets(results):
    """The figures the targets are stated in, per size: the modified UNet's channels_last_3d training step in
    bfloat16 against float32 (``training_precision``), and whole-case inference as the bundle runs by default against
    torch float32 and against the fastest peer's bare forward, per case and per run."""
    out = {}
    for size in SIZES:
        section = results.get(size, {})
        row = {}
        if "training_precision" in section:
            step = section["training_precision"]
            row["train_step_bf16_speedup"] = step["fp32"]["step_s"] / step["bf16"]["step_s"]
        if "inference" in section:
            whole = {r["runtime"].split(" (")[0]: r for r in section["inference"]["rows"] if r["kind"] == "whole case"}
            default = whole["bundle default"]
            row["inference_speedup_vs_torch_fp32"] = whole["torch fp32"]["per_case_s"] / default["per_case_s"]
            row["per_case_of_fastest_peer_forward"] = default["of_fastest_peer"]
            row["run_per_case_of_fastest_peer_forward"] = default["run_of_fastest_peer"]
            others = [r for name, r in whole.items() if name != "bundle default"]
            row["per_case_of_fastest_whole_case"] = default["per_case_s"] / min(r["per_case_s"] for r in others)
            row["run_of_fastest_whole_case"] = default["run_per_case_s"] / min(r["run_per_case_s"] for r in others)
        if row:
            out[size] = row
    return out


def main(
    sizes: tuple | list = ("demo", "paper"),
    repeats: int = 3,
    paper_repeats: int = 1,
    output: str = "benchmarks/results.json",
    scaling: bool = True,
    inference: bool = True,
    fidelity: bool = True,
    training: bool = True,
    inference_cases: int = 6,
    with_ceiling: bool = True,
    networks: bool = True,
    bf16: str = "auto",
    isles24: bool = False,
    isles24_cases: int = 3,
    pacs: bool = False,
    pacs_cases: int = 3,
):
    """Run every section for each size in ``sizes`` and write ``output`` (JSON).

    ``paper_repeats`` (timed calls after one warm-up) applies at the paper size, where one training step of each
    network takes tens of seconds on a CPU. ``bf16``: ``auto`` times bfloat16 beside float32 only on a CPU with
    native bfloat16 (``measured_precisions``), ``true`` or ``false`` decide. ``isles24``: add the ``isles24``
    section, on ``isles24_cases`` full-size synthetic cases. ``pacs``: add the ``pacs`` section (a real Orthanc), on
    ``pacs_cases`` studies. ``training false`` leaves out the training sections (``networks``,
    ``training_precision``, ``compile``, ``pipeline``); ``inference_cases``: the testing cases of each whole-case run
    of ``inference`` (its rounds are ``repeats``, at least 2). ``with_ceiling false`` leaves out the conv3d ceiling
    (and the ``of_ceiling`` figures), which ``networks`` needs; ``networks false`` leaves out ``networks``, ``compile``
    and ``pipeline`` (``training_precision`` stays).
    """
    precisions = measured_precisions(bf16)
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.is_available(),
            **onednn_kernels(),
            "precisions": list(precisions),
        },
        "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
    }
    print_table("machine", {k: str(v) for k, v in results["machine"].items()})
    if "bf16" not in precisions:
        print(
            "\nbf16 rows left out: no native bfloat16 on this CPU (emulated, they take minutes); --bf16 true times them"
        )
    for size in sizes:
        bs, features, spatial = SIZES[size]
        reps = repeats if size == "demo" else paper_repeats
        ceiling = section_ceiling(spatial, reps, precisions) if with_ceiling else {"best": {}}
        if with_ceiling:
            print_table(
                f"{size}: conv3d ceiling [2, 64, {spatial}] GFLOP/s",
                [{"precision": p, **row} for p, row in ceiling["gflops"].items()],
            )
            print_table(
                f"{size}: conv3d forward+backward GFLOP/s by channels (channels_last_3d)",
                [
                    {"precision": p, **{str(c): v for c, v in row.items()}}
                    for p, row in ceiling["channels_last_3d_forward_backward_gflops_by_channels"].items()
                ],
            )
        section = {"ceiling": ceiling}
        demo = size == "demo"
        if training:
            section.update(section_training(size, reps, repeats, ceiling, precisions, networks))
        if inference:
            section["inference"] = run_child(
                "inference",
                {
                    "size": size,
                    "repeats": max(2, reps),
                    "precisions": list(precisions),
                    "ceiling": ceiling["best"],
                    "cases": inference_cases,
                },
            )
            print_table(
                f"{size}: runtimes, bare forward and whole case (fastest peer: {section['inference']['fastest_peer']};"
                f" peak RSS {section['inference']['peak_rss_mib']:.0f} MiB)",
                section["inference"]["rows"],
            )
        if fidelity and "bf16" in precisions:
            section["fidelity"] = run_child("fidelity", {"size": size})
            print_table(
                f"{size}: bf16 against fp32 masks ({section['fidelity']['model']})", section["fidelity"]["cases"]
            )
            if demo:
                print_table(
                    f"{size}: demo training, best validation Dice", section["fidelity"]["demo_training_best_val_dice"]
                )
        results[size] = section
    if scaling:
        demo_features, paper_features = SIZES["demo"][1], SIZES["paper"][1]
        points = [(demo_features, b, s) for s in ([64, 64, 16], [128, 128, 32], [256, 256, 32]) for b in (1, 2, 4)]
        points += [(paper_features, b, [128, 128, 32]) for b in (1, 2)]
        results["scaling"] = section_scaling(points, max(1, repeats - 1))
        print_table("scaling of the modified UNet's training step (channels_last_3d)", results["scaling"])
    if as_bool(isles24, "isles24"):
        results["isles24"] = section_isles24(isles24_cases, max(1, repeats - 1))
        print_table("ISLES 2024 profiles, full-size synthetic cases, demo features, float32", results["isles24"])
    if as_bool(pacs, "pacs"):
        results["pacs"] = run_child("pacs", {"cases": pacs_cases, "repeats": repeats})
        print_table(
            f"PACS round trip against NIfTI inference, per study (peak RSS {results['pacs']['peak_rss_mib']:.0f} MiB)",
            results["pacs"]["rows"],
        )
    results["targets"] = targets(results)
    if results["targets"]:
        print_table("bf16 targets", [{"size": size, **row} for size, row in results["targets"].items()])
    write_atomically(output, lambda f: f.write((json.dumps(results, indent=4) + "\n").encode()))
    print(f"\nwritten {output}")


if __name__ == "__main__":
    run(main)
