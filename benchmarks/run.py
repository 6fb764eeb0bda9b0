"""Speed and memory of training and inference on this machine, against the hardware's practical ceiling.

    python benchmarks/run.py --repeats 3 --output benchmarks/results.json   # demo and paper size, ~30 min on 2 cores
    python benchmarks/run.py --sizes "['demo']"                             # demo size only, ~3 min

Each section prints a table and everything lands in one JSON file:
- ``ceiling``: GFLOP/s of one large ``conv3d`` forward (the practical ceiling of the convolution kernels);
- ``networks``: one training step (forward, Jaccard loss, backward, Adam) of the modified UNet, the classic
  baseline (BasicUNet) and MONAI's UNet on tensors already in memory, FLOPs counted with torch's
  ``FlopCounterMode``, as GFLOP/s and as a ratio to the ceiling, in both memory formats;
- ``compile`` (demo size): the modified UNet's step under ``torch.compile``, with the time the first step took;
- ``pipeline``: the time per batch of the real CacheDataset + random transforms of configs/train.json through
  DataLoader (num_workers 0, 1, 2) and ThreadDataLoader, alone and (demo size) feeding the training step, and the
  share the data pipeline adds to the step on in-memory tensors (at the paper size, where one step takes half a
  minute here, the share is estimated as loader time / step time);
- ``inference``: whole-case inference through configs/inference.json (load 5 maps, preprocess, predict, invert,
  save the NIfTI mask) per case once the workflow runs, and the whole ``run`` per case including start-up, CSV and
  PNG overlays, against the bare forward of the same network at ``spatial_size``;
- ``scaling``: step time and peak memory against batch size and spatial size, demo and paper features;
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
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from scripts.demo import network_settings  # noqa: E402

SIZES = {  # name: (batch, features, spatial_size)
    "demo": (2, network_settings()["features"], network_settings()["spatial_size"]),
    "paper": (2, [64, 128, 256, 512, 1024], [128, 128, 32]),
}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


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
    from scripts.networks import ModifiedUNet

    return {
        "modified": ModifiedUNet(features=features),
        "classic (BasicUNet)": BasicUNet(
            3, 5, 2, features=list(features) + [features[0]], act="relu", norm="batch", dropout=0.0, upsample="deconv"
        ),
        "monai UNet": UNet(
            3, 5, 2, channels=features, strides=[2] * (len(features) - 1), num_res_units=2, norm="instance"
        ),
    }


def make_step(net, memory_format):
    """One training step of ``net`` on a batch dict, the loss and optimizer of configs/train.json."""
    from monai.losses import DiceLoss

    net = net.to(memory_format=memory_format).train()
    loss_fn = DiceLoss(jaccard=True, include_background=False, to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-4, weight_decay=1e-3)

    def step(image, label):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(image.to(memory_format=memory_format)), label)
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


def conv3d_gflops(channels, spatial, memory_format, repeats, backward=False):
    """GFLOP/s of a ``channels`` -> ``channels`` 3x3x3 conv3d on [2, channels, *spatial], forward or forward+backward."""
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(memory_format=memory_format)
    x = torch.randn(2, channels, *spatial).to(memory_format=memory_format).requires_grad_(backward)
    flops = 2 * channels * channels * 27 * x[:, :1].numel() * (3 if backward else 1)

    def run():
        if backward:
            conv(x).sum().backward()
        else:
            with torch.no_grad():
                conv(x)

    return flops / timed(run, repeats) / 1e9


def section_ceiling(spatial, repeats):
    """The practical ceiling: GFLOP/s of a 64->64 channel conv3d forward on [2, 64, *spatial], in both memory
    formats; and, to show what narrow layers can reach, channels_last_3d forward+backward at 8 to 64 channels."""
    out = {name: conv3d_gflops(64, spatial, fmt, repeats) for name, fmt in MEMORY_FORMATS.items()}
    narrow = {c: conv3d_gflops(c, spatial, torch.channels_last_3d, repeats, backward=True) for c in (8, 16, 32, 64)}
    return {"gflops": out, "best": max(out.values()), "channels_last_3d_forward_backward_gflops_by_channels": narrow}


def section_networks(size, repeats, ceiling):
    bs, features, spatial = SIZES[size]
    image, label = batch(bs, spatial)
    rows = []
    for name, net in networks(features).items():
        flops = step_flops(net, image, label)
        for fmt_name, fmt in MEMORY_FORMATS.items():
            step = make_step(net, fmt)
            seconds = timed(lambda: step(image, label), repeats)
            rows.append(
                {
                    "network": name,
                    "memory_format": fmt_name,
                    "step_s": seconds,
                    "gflop": flops / 1e9,
                    "gflops": flops / seconds / 1e9,
                    "of_ceiling": flops / seconds / 1e9 / ceiling,
                }
            )
    return rows


def section_compile(size, repeats, ceiling):
    """The modified UNet's step with the network under ``torch.compile`` (inductor), channels_last_3d."""
    from scripts.networks import ModifiedUNet

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
        "of_ceiling": flops / seconds / 1e9 / ceiling,
    }


def synthetic_datalist(workdir, num_cases):
    from scripts.datalist import load_fold
    from scripts.prepare_datalist import main as write_datalist
    from scripts.synthetic_isles import generate

    root = os.path.join(workdir, "isles")
    generate(root, num_train=num_cases, num_test=2, seed=0)
    path = os.path.join(workdir, "datalist.json")
    write_datalist(root, path, folds=2, seed=0)
    return root, path, load_fold(path, root, 0)


def train_parser(size, root, datalist_path, **override):
    from monai.bundle import ConfigParser

    bs, features, spatial = SIZES[size]
    parser = ConfigParser()
    parser.read_config(os.path.join(REPO_ROOT, "configs", "train.json"))
    parser.update(
        {
            "bundle_root": tempfile.mkdtemp(),
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


def section_inference(size, repeats, workdir, num_workers):
    """Per-case whole inference through configs/inference.json vs the bare forward of its network."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow
    from scripts.networks import ModifiedUNet
    from scripts.synthetic_isles import generate

    bs, features, spatial = SIZES[size]
    cases = 6
    root = os.path.join(workdir, "isles_inference")
    generate(root, num_train=0, num_test=cases, seed=1)
    bundle_root = tempfile.mkdtemp(dir=workdir)
    os.makedirs(os.path.join(bundle_root, "models"))
    torch.save(ModifiedUNet(features=features).state_dict(), os.path.join(bundle_root, "models", "model.pt"))
    rows = []
    for workers in num_workers:
        wf = ConfigWorkflow(
            config_file=os.path.join(REPO_ROOT, "configs", "inference.json"),
            workflow_type="infer",
            meta_file=os.path.join(REPO_ROOT, "configs", "metadata.json"),
            bundle_root=bundle_root,
            dataset_dir=root,
            features=features,
            spatial_size=spatial,
            num_workers=workers,
            output_dir=tempfile.mkdtemp(dir=workdir),
        )
        start = time.perf_counter()
        wf.initialize()
        done = []
        wf.parser.get_parsed_content("evaluator").add_event_handler(
            Events.ITERATION_COMPLETED, lambda: done.append(time.perf_counter())
        )
        wf.run()
        wf.finalize()
        run_s = (time.perf_counter() - start) / cases
        net = wf.parser.get_parsed_content("network").eval()  # checkpoint loaded, configured memory format
        x = torch.randn(1, 5, *spatial)
        with torch.no_grad():
            forward = timed(lambda: net(x), repeats)
        per_case = (done[-1] - done[0]) / (len(done) - 1)  # steady state: case 2 to the last
        rows.append(
            {
                "num_workers": workers,
                "per_case_s": per_case,
                "bare_forward_s": forward,
                "ratio": per_case / forward,
                "run_per_case_s": run_s,
                "run_ratio": run_s / forward,
            }
        )
    return rows


def section_scaling(points, repeats):
    """Training step time and peak RSS at each ``(features, batch, spatial)`` point, each in its own process."""
    return [
        run_child("scaling_point", {"features": f, "batch": b, "spatial": s, "repeats": repeats}) for f, b, s in points
    ]


def scaling_point(features, batch_size, spatial, repeats):
    from scripts.networks import ModifiedUNet

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
    """Run one section in a fresh process so its peak RSS is its own."""
    code = (
        f"import json, sys; sys.path.insert(0, {REPO_ROOT!r}); from benchmarks.run import child; "
        f"print('@@' + json.dumps(child({section!r}, {json.dumps(kwargs)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.rsplit("@@", 1)[1])


def child(section, kwargs_json):
    kwargs = json.loads(kwargs_json)
    if section == "scaling_point":
        return scaling_point(kwargs["features"], kwargs["batch"], kwargs["spatial"], kwargs["repeats"])
    with tempfile.TemporaryDirectory() as workdir:
        if section == "pipeline":
            result = section_pipeline(kwargs["size"], kwargs["repeats"], workdir, kwargs["with_steps"])
        else:
            result = section_inference(kwargs["size"], kwargs["repeats"], workdir, kwargs["num_workers"])
    return {"rows": result, "peak_rss_mib": peak_rss_mib()}


def print_table(title, rows):
    print(f"\n## {title}")
    rows = rows if isinstance(rows, list) else [rows]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


def main(
    sizes=("demo", "paper"), repeats=3, paper_repeats=1, output="benchmarks/results.json", scaling=True, inference=True
):
    """Run every section for each size in ``sizes`` and write ``output`` (JSON).

    ``paper_repeats`` (timed calls after one warm-up) applies at the paper size, where one training step of each
    network takes tens of seconds on a CPU.
    """
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.cuda.is_available(),
        },
        "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:]),
    }
    for size in sizes:
        bs, features, spatial = SIZES[size]
        reps = repeats if size == "demo" else paper_repeats
        ceiling = section_ceiling(spatial, reps)
        print_table(f"{size}: conv3d ceiling [2, 64, {spatial}] GFLOP/s", ceiling["gflops"])
        print_table(
            f"{size}: conv3d forward+backward GFLOP/s by channels (channels_last_3d)",
            {str(c): v for c, v in ceiling["channels_last_3d_forward_backward_gflops_by_channels"].items()},
        )
        nets = section_networks(size, reps, ceiling["best"])
        print_table(f"{size}: training step, batch {bs}, features {features}, input {spatial}", nets)
        section = {"ceiling": ceiling, "networks": nets}
        demo = size == "demo"
        if demo:  # compiling the paper-size network takes too long on a CPU to be worth a row
            section["compile"] = section_compile(size, reps, ceiling["best"])
            print_table(f"{size}: training step with torch.compile", section["compile"])
        section["pipeline"] = run_child("pipeline", {"size": size, "repeats": repeats, "with_steps": demo})
        if not demo:  # one step here takes tens of seconds: the share is the loader's time over the step's
            step = next(
                r["step_s"] for r in nets if r["network"] == "modified" and r["memory_format"] == "channels_last_3d"
            )
            for row in section["pipeline"]["rows"]:
                row["pipeline_share_estimate"] = row["loader_s"] / step
        print_table(
            f"{size}: data pipeline per batch (peak RSS {section['pipeline']['peak_rss_mib']:.0f} MiB)",
            section["pipeline"]["rows"],
        )
        if inference:
            section["inference"] = run_child(
                "inference", {"size": size, "repeats": reps, "num_workers": [0, 4] if demo else [4]}
            )
            print_table(
                f"{size}: whole-case inference (peak RSS {section['inference']['peak_rss_mib']:.0f} MiB)",
                section["inference"]["rows"],
            )
        results[size] = section
    if scaling:
        demo_features, paper_features = SIZES["demo"][1], SIZES["paper"][1]
        points = [(demo_features, b, s) for s in ([64, 64, 16], [128, 128, 32], [256, 256, 32]) for b in (1, 2, 4)]
        points += [(paper_features, b, [128, 128, 32]) for b in (1, 2)]
        results["scaling"] = section_scaling(points, max(1, repeats - 1))
        print_table("scaling of the modified UNet's training step (channels_last_3d)", results["scaling"])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwritten {output}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
