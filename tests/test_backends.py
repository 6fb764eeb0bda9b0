"""The inference runtimes (scripts/engine/backends.py): which one ``auto`` picks on each kind of CPU, and that each
one's masks are torch's float32 masks, through the inferers alone and through configs/inference.json."""

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SlidingWindowInferer
from scripts.engine import backends
from scripts.engine.backends import OpenVinoInferer, choose_backend
from scripts.engine.inferers import NATIVE_BF16_ENV, FlipInferer, make_inferer
from scripts.engine.networks import ModifiedUNet
from scripts.monai_gaps import CpuAutocastInferer

OPENVINO_MISSING = "OpenVINO is not installed (pip install openvino, pinned in requirements-dev.txt)"
needs_openvino = pytest.mark.skipif(backends.openvino_version() is None, reason=OPENVINO_MISSING)
FEATURES = [4, 8, 16, 32, 64]


@pytest.mark.parametrize(
    "backend, amp, device, native, installed, expected",
    [
        ("auto", True, "cpu", True, True, "openvino"),  # AMX or AVX512-BF16, bfloat16: OpenVINO
        ("auto", False, "cpu", True, True, "torch"),  # float32 asked for
        ("auto", True, "cpu", False, True, "torch"),  # AVX2 only: bfloat16 would be emulated
        ("auto", False, "cpu", False, True, "torch"),  # AVX2 only, the default float32
        ("auto", True, "cpu", True, False, "torch"),  # OpenVINO not installed
        ("auto", True, "cuda:0", True, True, "torch"),
        ("torch", True, "cpu", True, True, "torch"),
        ("openvino", False, "cpu", False, True, "openvino"),
        (" OpenVINO ", True, "cpu", True, True, "openvino"),
    ],
)
def test_auto_picks_openvino_for_native_bf16_on_the_cpu(monkeypatch, backend, amp, device, native, installed, expected):
    monkeypatch.setattr(backends, "openvino_version", lambda: "2026.4.1" if installed else None)
    runtime, reason = choose_backend(backend, amp, device, native)
    assert runtime == expected and reason
    if not installed:
        assert "pip install openvino" in reason


def test_an_impossible_backend_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of auto, torch, openvino, got 'onnx'"):
        choose_backend("onnx", True, "cpu", True)
    monkeypatch.setattr(backends, "openvino_version", lambda: "2026.4.1")
    with pytest.raises(ValueError, match="CPU only, and device is cuda:0"):
        choose_backend("openvino", True, "cuda:0", True)
    monkeypatch.setattr(backends, "openvino_version", lambda: None)
    with pytest.raises(ValueError, match="not installed \\(pip install openvino\\)"):
        choose_backend("openvino", True, "cpu", True)


@pytest.mark.parametrize("native", [True, False])
def test_the_inference_config_logs_its_runtime_and_wraps_every_path(repo_root, monkeypatch, caplog, native):
    """configs/inference.json's inferer on a CPU with and without native bfloat16 (set, not read from this CPU), with
    OpenVINO present: mirroring and the sliding window inside OpenVINO's inferer, or bfloat16 autocast in torch."""
    from monai.bundle import ConfigParser

    monkeypatch.setenv(NATIVE_BF16_ENV, str(native).lower())
    monkeypatch.setattr(backends, "openvino_version", lambda: "2026.4.1")
    parser = ConfigParser()
    parser.read_config(os.path.join(repo_root, "configs", "inference.json"))
    parser.update({"device": "cpu", "tta_flips": True, "sliding_window_size": [32, 32, 16]})
    with caplog.at_level(logging.INFO, logger="scripts.engine.inferers"):
        inferer = parser.get_parsed_content("inferer")
    if native:
        assert type(inferer) is OpenVinoInferer and inferer.precision == "bf16"
        assert "inference runs in openvino: OpenVINO 2026.4.1 installed, CPU with native bfloat16" in caplog.text
    else:
        assert "inference runs in torch: float32 (amp false)" in caplog.text
    flips = inferer.inferer if native else inferer
    assert isinstance(flips, FlipInferer) and isinstance(flips.inferer, SlidingWindowInferer)
    if native:
        assert type(make_inferer(amp=True, device="cpu", backend="torch")) is CpuAutocastInferer


def network(seed=0):
    """A small modified UNet with weights away from their initial values (norm weights of exactly 1 hide errors)."""
    torch.manual_seed(seed)
    net = ModifiedUNet(features=FEATURES)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def dice(a, b):
    return 1.0 if not (a.any() or b.any()) else float(2 * (a & b).sum() / (a.sum() + b.sum()))


INFERERS = {
    "one pass": lambda: SimpleInferer(),
    "mirroring": lambda: FlipInferer(),
    "sliding window": lambda: SlidingWindowInferer(roi_size=[32, 32, 16], sw_batch_size=1, overlap=0.5),
}


@pytest.fixture(scope="module")
def openvino_networks():
    """The network of these tests exported to OpenVINO once, in each precision (``OpenVinoInferer`` holds one such
    network per torch network; here each inferer runs it directly)."""
    net = network()
    return net, {precision: backends.OpenVinoNetwork(net, precision) for precision in ("f32", "bf16")}


@needs_openvino
@pytest.mark.parametrize("precision", ["f32", "bf16"])
@pytest.mark.parametrize("path", list(INFERERS))
def test_openvino_masks_are_the_torch_float32_masks(openvino_networks, path, precision):
    """The lesion masks (softmax > 0.5) of each inferer with the network run in OpenVINO against the same inferer in
    torch float32; float32 gives the same probabilities to 1e-4. Two input shapes: one network compiled for each
    (the sliding window's windows have one shape)."""
    net, compiled = openvino_networks
    shapes = ([32, 32, 32], [48, 32, 16])
    for seed, shape in enumerate(shapes):
        x = torch.randn(1, 5, *shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = torch.softmax(INFERERS[path]()(x, net), 1)
            got = torch.softmax(INFERERS[path]()(x, compiled[precision]), 1)
        assert got.shape == expected.shape and got.dtype == torch.float32
        lesion, reference = (got[:, 1] > 0.5).numpy(), (expected[:, 1] > 0.5).numpy()
        assert 0.05 < reference.mean() < 0.95, "masks that mean something"
        if precision == "f32":
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert dice(lesion, reference) >= (0.999 if precision == "f32" else 0.99)


@needs_openvino
def test_new_weights_are_exported_again_and_training_mode_stays_in_torch():
    net, other = network(0), network(1)
    x = torch.randn(1, 5, 32, 32, 16, generator=torch.Generator().manual_seed(3))
    inferer = OpenVinoInferer(SimpleInferer(), "f32")
    with torch.no_grad():
        torch.testing.assert_close(inferer(x, net), net(x), atol=1e-4, rtol=0)
        net.load_state_dict(other.state_dict())  # what the checkpoint loader does before the first case
        torch.testing.assert_close(inferer(x, net), other(x), atol=1e-4, rtol=0)
        net.train()
        torch.manual_seed(0)
        train_out = net(x)
        torch.manual_seed(0)
        assert torch.equal(inferer(x, net), train_out), "a network in training mode runs in torch"
    meta = MetaTensor(x, affine=torch.diag(torch.tensor([2.0, 2.0, 5.0, 1.0])))
    out = OpenVinoInferer(SimpleInferer(), "f32")(meta, net.eval())
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, meta.affine)


def signal_stack():
    """(address, flags, size) of this thread's alternate signal stack (sigaltstack(2))."""
    current = backends._SignalStack()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current))
    return current.ss_sp, current.ss_flags, current.ss_size


@needs_openvino
@pytest.mark.skipif(sys.platform != "linux", reason="sigaltstack is read through Linux's libc")
def test_openvino_leaves_the_threads_signal_stack_as_it_found_it():
    """OpenVINO gives a compiling thread an 11.5 KB alternate signal stack, which it frees with the network."""
    before = signal_stack()
    with torch.no_grad():
        OpenVinoInferer(SimpleInferer(), "f32")(torch.randn(1, 5, 32, 32, 16), network(0))
    assert signal_stack() == before


@needs_openvino
@pytest.mark.skipif(sys.platform != "linux", reason="sigaltstack is read through Linux's libc")
def test_a_signal_after_openvino_networks_freed_out_of_order_is_handled(repo_root):
    """Two runtimes freed in the order they were compiled left the thread a signal stack in freed memory: the next
    Python signal handler (a DataLoader's SIGCHLD) killed the process with SIGSEGV (benchmarks/run.py's crash)."""
    code = """if True:
        import gc, os, signal, torch, openvino
        from scripts.engine.backends import signal_stack_kept
        x = torch.randn(1, 5, 16, 16, 8)
        model = openvino.convert_model(torch.nn.Conv3d(5, 4, 3), example_input=x)
        with signal_stack_kept():
            first = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        with signal_stack_kept():
            second = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        first({0: x.numpy()}), second({0: x.numpy()})
        del first; gc.collect(); del second; gc.collect()
        signal.signal(signal.SIGUSR1, lambda *args: print("handled", flush=True))
        os.kill(os.getpid(), signal.SIGUSR1)
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert done.returncode == 0 and "handled" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_the_cache_key_is_what_determines_the_converted_network(monkeypatch):
    """The same network, weights, input shape and versions give one key; any of them changed, another."""
    shape = (1, 5, 32, 32, 16)
    key = backends.cache_key(network(0), shape)
    assert backends.cache_key(network(0), shape) == key
    assert backends.cache_key(network(0).to(memory_format=torch.channels_last_3d), shape) == key, "same weights"
    other_weights = network(0)
    with torch.no_grad():
        next(other_weights.parameters()).view(-1)[0] += 1e-6
    other_config = ModifiedUNet(features=FEATURES, dilations=(1, 1, 1, 1, 1)).eval()
    other_config.load_state_dict(network(0).state_dict())
    others = [
        backends.cache_key(other_weights, shape),
        backends.cache_key(network(0), (1, 5, 32, 32, 32)),
        backends.cache_key(other_config, shape),
    ]
    monkeypatch.setattr(backends, "openvino_version", lambda: "0.0.0")
    others.append(backends.cache_key(network(0), shape))
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    others.append(backends.cache_key(network(0), shape))
    assert len({key, *others}) == 6


def test_the_cache_folder_is_the_users_and_the_configs_id(repo_root, monkeypatch, tmp_path):
    from monai.bundle import ConfigParser

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert backends.default_cache_dir() == str(tmp_path / "isles_ctp_segmentation" / "openvino")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert backends.default_cache_dir() == str(tmp_path / "home" / ".cache" / "isles_ctp_segmentation" / "openvino")
    parser = ConfigParser()
    parser.read_config(os.path.join(repo_root, "configs", "inference.json"))
    assert parser.get_parsed_content("openvino_cache_dir") == backends.default_cache_dir()


def cache_entries(cache_dir):
    """The cache folder's entries (one per converted network), OpenVINO's compiled networks and anything else."""
    names = sorted(os.listdir(cache_dir))
    compiled = sorted(os.listdir(os.path.join(cache_dir, backends.COMPILED))) if backends.COMPILED in names else []
    return [name for name in names if name != backends.COMPILED], compiled


def stamps(folder):
    """Every file under ``folder`` with its inode, size and modification time: what a rewrite would change."""
    return {
        os.path.relpath(os.path.join(root, name), folder): (os.stat(os.path.join(root, name)).st_ino,)
        + (os.stat(os.path.join(root, name)).st_size, os.stat(os.path.join(root, name)).st_mtime_ns)
        for root, _, names in os.walk(folder)
        for name in names
    }


@needs_openvino
def test_a_second_process_reads_the_converted_network_from_the_cache(repo_root, synthetic_tree, tmp_path):
    """Two runs of configs/inference.json in two fresh processes (``monai.bundle run``, the default ``auto`` on a CPU
    with native bfloat16): the first converts the network and stores it in ``openvino_cache_dir``, the second reads
    it from there (its log says so, no file of the cache folder is written again) and writes the same masks."""
    checkpoint = tmp_path / "model.pt"
    torch.save(network(0).state_dict(), checkpoint)
    cache_dir = tmp_path / "cache"
    masks, logs = [], []
    for run in range(2):
        output_dir = tmp_path / f"run_{run}"
        args = {
            "config_file": "configs/inference.json",
            "meta_file": "configs/metadata.json",
            "logging_file": "configs/logging.conf",
            "bundle_root": str(output_dir),
            "output_dir": str(output_dir),
            "dataset_dir": synthetic_tree,
            "ensemble_checkpoints": f"['{checkpoint}']",
            "features": str(FEATURES).replace(" ", ""),
            "spatial_size": "[32,32,16]",
            "num_workers": "0",
            "openvino_cache_dir": str(cache_dir),
        }
        cmd = [sys.executable, "-m", "monai.bundle", "run", *[x for k, v in args.items() for x in (f"--{k}", v)]]
        env = {**os.environ, NATIVE_BF16_ENV: "true"}
        result = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        logs.append(result.stdout + result.stderr)
        folder = output_dir / "predictions" / "masks"
        masks.append({name: np.asanyarray(nib.load(folder / name).dataobj) for name in sorted(os.listdir(folder))})
        if run == 0:
            entries, compiled = cache_entries(cache_dir)
            assert len(entries) == 1 and len(compiled) == 1, (entries, compiled)
            assert sorted(os.listdir(cache_dir / entries[0])) == sorted([*backends.MODEL_FILES, backends.DIGESTS])
            written = stamps(cache_dir)
    assert "inference runs in openvino" in logs[0] and "inference runs in openvino" in logs[1]
    assert f"network converted for input [1, 5, 32, 32, 16], cached in {cache_dir / entries[0]}" in logs[0]
    assert "network converted" not in logs[1]
    assert f"network for input [1, 5, 32, 32, 16] read from the cache {cache_dir / entries[0]}" in logs[1]
    assert stamps(cache_dir) == written, "nothing converted, compiled or stored again"
    assert masks[0].keys() == masks[1].keys() and len(masks[0]) == 2
    assert any(mask.any() for mask in masks[0].values()), "masks that mean something"
    assert all(np.array_equal(masks[0][case], masks[1][case]) for case in masks[0])


def corrupt(entry, compiled_dir, how):
    """Damage a cache entry (and OpenVINO's compiled networks) as a kill, a full disk or a bad sector would."""
    xml, bin_, digests = (os.path.join(entry, name) for name in (*backends.MODEL_FILES, backends.DIGESTS))
    if how == "weights truncated":
        os.truncate(bin_, os.path.getsize(bin_) // 2)
    elif how == "one weight byte changed":
        with open(bin_, "r+b") as f:
            f.seek(os.path.getsize(bin_) // 3)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
    elif how == "model garbage":
        with open(xml, "w") as f:
            f.write("<net")
    elif how == "no digest (partial)":
        os.remove(digests)
    elif how == "digest garbage":
        with open(digests, "w") as f:
            f.write("[1, 2")
    elif how == "weights missing":
        os.remove(bin_)
    for folder, _, names in os.walk(compiled_dir):
        for name in names:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"garbage")


@pytest.fixture(scope="module")
def cached_network(tmp_path_factory):
    """A cache folder holding one converted network (and OpenVINO's compiled network): the network and the folder."""
    net, cache_dir = network(), tmp_path_factory.mktemp("openvino_cache")
    x = torch.randn(1, 5, 32, 32, 16, generator=torch.Generator().manual_seed(5))
    backends.OpenVinoNetwork(net, "f32", str(cache_dir))(x)
    return net, cache_dir


@needs_openvino
@pytest.mark.parametrize(
    "how",
    [
        "weights truncated",
        "one weight byte changed",
        "model garbage",
        "no digest (partial)",
        "digest garbage",
        "weights missing",
    ],
)
def test_a_partial_or_corrupt_cache_entry_is_ignored_and_rebuilt(cached_network, tmp_path, caplog, how):
    """A damaged entry is not run: it is removed with a warning naming it, the network converted and stored again,
    and the outputs are the torch network's; OpenVINO itself recompiles over damaged compiled networks."""
    net, cached = cached_network
    cache_dir = tmp_path / "cache"
    shutil.copytree(cached, cache_dir)
    (entry,), _ = cache_entries(cache_dir)
    corrupt(cache_dir / entry, cache_dir / backends.COMPILED, how)
    x = torch.randn(1, 5, 32, 32, 16, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.INFO, logger="scripts.engine.backends"), torch.no_grad():
        torch.testing.assert_close(backends.OpenVinoNetwork(net, "f32", str(cache_dir))(x), net(x), atol=1e-4, rtol=0)
    assert f"cache entry {cache_dir / entry} is partial or corrupt" in caplog.text
    assert f"network converted for input [1, 5, 32, 32, 16], cached in {cache_dir / entry}" in caplog.text
    assert cache_entries(cache_dir)[0] == [entry], "rebuilt in place, nothing left beside it"
    assert stamps(cache_dir / entry).keys() == stamps(cached / entry).keys()
    weights = backends.MODEL_FILES[1]  # the model's XML differs between conversions in its node names only
    assert (cache_dir / entry / weights).read_bytes() == (cached / entry / weights).read_bytes()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scripts.engine.backends"):
        backends.OpenVinoNetwork(net, "f32", str(cache_dir))(x)
    assert "read from the cache" in caplog.text and "converted" not in caplog.text


@needs_openvino
def test_a_store_killed_before_its_rename_leaves_nothing_that_stays(cached_network, tmp_path):
    """The temporary folder of a store killed before its rename (kill -9) is never read as an entry, and the next
    store removes it once it is older than ``STALE_PARTIAL_S``; a younger one (another process writing) stays."""
    net, cached = cached_network
    cache_dir = tmp_path / "cache"
    shutil.copytree(cached, cache_dir)
    (entry,), _ = cache_entries(cache_dir)
    killed, writing = cache_dir / f".{entry}.killed.partial", cache_dir / f".{entry}.writing.partial"
    for folder in (killed, writing):
        shutil.copytree(cache_dir / entry, folder)
    old = time.time() - backends.STALE_PARTIAL_S - 60
    os.utime(killed, (old, old))
    x = torch.randn(1, 5, 32, 64, 16, generator=torch.Generator().manual_seed(5))  # another shape: a new entry
    with torch.no_grad():
        torch.testing.assert_close(backends.OpenVinoNetwork(net, "f32", str(cache_dir))(x), net(x), atol=1e-4, rtol=0)
    assert not killed.exists() and writing.exists()
    assert len([name for name in cache_entries(cache_dir)[0] if not name.startswith(".")]) == 2, "the new entry"


@needs_openvino
def test_one_cache_folder_serves_both_precisions(tmp_path):
    """A network compiled in float32 and then in bfloat16 through one cache folder runs as it runs without the cache
    in each precision (OpenVINO 2026.4.1's own compiled cache, shared, gave the float32 network to the bfloat16
    compile, which then ran it wrong: Dice 0.73)."""
    net = network()
    x = torch.randn(1, 5, 32, 32, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for precision in ("f32", "bf16", "f32", "bf16"):
            got = torch.softmax(backends.OpenVinoNetwork(net, precision, str(tmp_path))(x), 1)[:, 1] > 0.5
            expected = torch.softmax(backends.OpenVinoNetwork(net, precision)(x), 1)[:, 1] > 0.5
            assert dice(got.numpy(), expected.numpy()) >= 0.999, precision
    assert sorted(os.listdir(tmp_path / backends.COMPILED)) == ["bf16", "f32"]


@needs_openvino
def test_without_a_usable_cache_folder_the_network_is_converted_each_time(tmp_path, caplog):
    """A cache folder that cannot be created (here a file stands in its way) costs the cache, not the run: a warning
    names it and the network runs; ``None`` means no cache."""
    net = network()
    (tmp_path / "a_file").write_text("")
    x = torch.randn(1, 5, 32, 32, 16, generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.INFO, logger="scripts.engine.backends"), torch.no_grad():
        for cache_dir in (str(tmp_path / "a_file" / "cache"), None):
            torch.testing.assert_close(backends.OpenVinoNetwork(net, "f32", cache_dir)(x), net(x), atol=1e-4, rtol=0)
    assert f"could not be cached in {tmp_path / 'a_file' / 'cache'}" in caplog.text
    assert caplog.text.count("network converted for input [1, 5, 32, 32, 16]\n") == 2


def infer(repo_root, dataset_dir, checkpoints, output_dir, **settings):
    """configs/inference.json on the testing cases of ``dataset_dir`` with the networks saved in ``checkpoints``;
    the masks it wrote, by case."""
    wf = ConfigWorkflow(
        config_file=os.path.join(repo_root, "configs", "inference.json"),
        meta_file=os.path.join(repo_root, "configs", "metadata.json"),
        workflow_type="infer",
        bundle_root=str(output_dir),
        output_dir=str(output_dir),
        dataset_dir=dataset_dir,
        ensemble_checkpoints=[str(path) for path in checkpoints],
        features=FEATURES,
        spatial_size=[32, 32, 16],
        num_workers=0,
        **settings,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    masks = output_dir / "predictions" / "masks"
    return {name: np.asanyarray(nib.load(masks / name).dataobj) > 0 for name in sorted(os.listdir(masks))}


@needs_openvino
@pytest.mark.parametrize(
    "settings",
    [
        {"amp": False, "inference_backend": "openvino"},
        {"amp": True, "inference_backend": "auto", "tta_flips": True, "ensemble": True},
    ],
    ids=["float32", "bfloat16_auto_mirroring_ensemble"],
)
def test_inference_config_masks_in_openvino_are_the_torch_ones(
    repo_root, synthetic_tree, tmp_path, monkeypatch, settings
):
    """Whole-case inference (load, pre-process, predict, invert, write) in OpenVINO against torch float32 with the same
    mirroring and ensemble, on the synthetic tree's testing cases, with networks of perturbed weights (no training
    needed; tests/test_precision.py holds a trained model's bfloat16 to its float32): per case Dice >= 0.999 in
    float32, >= 0.99 and lesion volumes within 1 % in bfloat16."""
    monkeypatch.setenv(NATIVE_BF16_ENV, "true")  # a CPU with native bfloat16, where ``auto`` picks OpenVINO
    settings = dict(settings)
    checkpoints = []
    for seed in range(2 if settings.pop("ensemble", False) else 1):
        checkpoints.append(tmp_path / f"model_{seed}.pt")
        torch.save(network(seed).state_dict(), checkpoints[-1])
    torch_settings = {**settings, "amp": False, "inference_backend": "torch"}
    reference = infer(repo_root, synthetic_tree, checkpoints, tmp_path / "torch", **torch_settings)
    got = infer(repo_root, synthetic_tree, checkpoints, tmp_path / "openvino", **settings)
    assert got.keys() == reference.keys() and len(got) == 2
    assert all(0 < mask.mean() < 1 for mask in reference.values()), "masks that mean something"
    for case, mask in reference.items():
        assert dice(got[case], mask) >= (0.99 if settings["amp"] else 0.999), case
        if settings["amp"]:
            assert got[case].sum() == pytest.approx(mask.sum(), rel=0.01, abs=1), case


def gpu_script(repo_root, tmp_path, *args):
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as on a machine without a GPU, whatever this one has
    output = tmp_path / "gpu.json"
    cmd = [sys.executable, "benchmarks/gpu.py", "--output", str(output), *args]
    result = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=1200, check=False)
    return result, output


def test_the_gpu_script_refuses_without_cuda(repo_root, tmp_path):
    result, output = gpu_script(repo_root, tmp_path)
    assert result.returncode == 2 and not output.exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "benchmarks/gpu.py measures a GPU and this machine has no CUDA device (torch.cuda.is_available() is False)"
    )


def test_the_gpu_script_runs_every_section_on_the_cpu(repo_root, tmp_path):
    """``--allow_cpu true``: the script's code at a tiny size on the CPU (what can be checked here of a GPU run):
    every section gives its figures, and the training, evaluation and inference configs pass."""
    import json

    result, output = gpu_script(repo_root, tmp_path, "--allow_cpu", "true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(output.read_text())
    assert "no GPU figure" in results["machine"]["note"]
    assert [(r["channels_last_3d"], r["amp"]) for r in results["train_step"]] == [
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    ]
    assert all(r["step_ms"] > 0 for r in results["train_step"])
    assert results["epoch"]["steps_per_epoch"] > 0 and results["epoch"]["second_epoch_s"] > 0
    assert results["inference"]["per_case_s"] > 0
    checks = {row["check"]: row["outcome"] for row in results["configs"]}
    assert checks == {
        "training (train.json)": "passed",
        "evaluation (inference.json + evaluate.json)": "passed",
        "inference (inference.json)": "passed",
        "2-process DDP (multi_gpu_train.json)": "not run: 0 GPU(s)",
    }
