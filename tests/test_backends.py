"""The inference runtimes (scripts/engine/backends.py): which one ``auto`` picks on each kind of CPU, and that each
one's masks are torch's float32 masks, through the inferers alone and through configs/inference.json."""

import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SlidingWindowInferer
from scripts.engine import backends
from scripts.engine.backends import OpenVinoInferer, choose_backend
from scripts.engine.inferers import NATIVE_BF16_ENV, CpuAutocastInferer, FlipInferer, make_inferer
from scripts.engine.networks import ModifiedUNet

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
