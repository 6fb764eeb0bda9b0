"""bfloat16 on the CPU (`amp`): what runs in it, and that its masks and metrics are the float32 ones."""

import csv
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.inferers import SimpleInferer
from scripts.engine.inferers import NATIVE_BF16_ENV, FlipInferer, cpu_has_native_bf16, make_inferer, warn_emulated_bf16
from scripts.monai_gaps import CpuAutocastInferer, engine_amp


@pytest.mark.parametrize(
    "flags, native",
    [
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n", True),
        ("flags\t\t: fpu sse2 avx2 amx_tile amx_bf16\n", True),
        ("Features\t: fp asimd sve bf16 i8mm\n", True),
        ("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n", False),  # AVX512 alone: oneDNN emulates bfloat16
    ],
    ids=["avx512_bf16", "amx", "arm_bf16", "emulated"],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, native):
    monkeypatch.delenv(NATIVE_BF16_ENV)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + flags)
    assert cpu_has_native_bf16(str(cpuinfo)) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("native", [True, False])
def test_the_environment_variable_replaces_the_cpu_flags(tmp_path, monkeypatch, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 amx_bf16\n" if not native else "flags\t\t: fpu sse2 avx2\n")
    monkeypatch.setenv(NATIVE_BF16_ENV, str(native).lower())
    assert cpu_has_native_bf16(str(cpuinfo)) is native
    monkeypatch.setenv(NATIVE_BF16_ENV, "maybe")
    with pytest.raises(ValueError, match=NATIVE_BF16_ENV):
        cpu_has_native_bf16(str(cpuinfo))


@pytest.mark.parametrize("native", [True, False])
def test_inference_and_evaluation_default_to_bf16_only_where_the_cpu_has_it(repo_root, monkeypatch, native):
    """The ``amp`` default and the torch inferer of inference.json and evaluate.json, for a CPU with and without
    native bfloat16 (set, not read from this machine); which runtime ``auto`` picks: tests/test_backends.py."""
    monkeypatch.setenv(NATIVE_BF16_ENV, str(native).lower())
    for files, inferer_id in ((["inference.json"], "inferer"), (["inference.json", "evaluate.json"], "inferer")):
        parser = ConfigParser()
        parser.read_config([os.path.join(repo_root, "configs", name) for name in files])
        parser.update({"device": "cpu", "inference_backend": "torch"})
        assert parser.get_parsed_content("amp") is native, files
        inferer = parser.get_parsed_content(inferer_id)
        assert type(inferer) is (CpuAutocastInferer if native else SimpleInferer), files


def test_forced_bf16_without_native_support_warns_once(monkeypatch, recwarn):
    monkeypatch.setenv(NATIVE_BF16_ENV, "false")
    warn_emulated_bf16.cache_clear()
    for _ in range(3):
        assert isinstance(make_inferer(amp="true", device="cpu"), CpuAutocastInferer)
    assert [str(w.message) for w in recwarn].count(str(recwarn[0].message)) == 1
    assert "emulated" in str(recwarn[0].message)
    monkeypatch.setenv(NATIVE_BF16_ENV, "true")
    warn_emulated_bf16.cache_clear()
    make_inferer(amp=True, device="cpu")
    make_inferer(amp=False, device="cpu")
    assert len(recwarn) == 1, "no warning where the CPU has native bfloat16, nor without amp"


def test_amp_on_the_cpu_runs_the_convolutions_in_bf16_and_returns_float32():
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.GroupNorm(4, 4))
    seen = []
    net[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x = torch.rand(1, 2, 8, 8, 4)
    for amp, inferer_type in ((True, CpuAutocastInferer), (False, SimpleInferer)):
        inferer = make_inferer(tta_flips=False, amp=amp, device="cpu")
        assert type(inferer) is inferer_type
        assert inferer(x, net).dtype == torch.float32
    assert seen == [torch.bfloat16, torch.float32]
    assert isinstance(make_inferer(tta_flips="true", amp="true", device="cpu").inferer, FlipInferer)
    assert engine_amp("true", "cpu") is False, "MONAI's engines autocast for CUDA only"


def demo_workflow(repo_root, demo_run, config, workflow_type, amp, output_dir):
    root, _, overrides = demo_run
    files = [os.path.join(repo_root, "configs", name) for name in config] + [
        os.path.join(repo_root, "configs", "demo.json")
    ]
    wf = ConfigWorkflow(
        config_file=files,
        meta_file=os.path.join(repo_root, "configs", "metadata.json"),
        workflow_type=workflow_type,
        bundle_root=str(root),
        output_dir=str(output_dir),
        spatial_size=overrides["spatial_size"],
        amp=amp,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def read_rows(path):
    with open(path, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def test_bf16_masks_of_the_trained_demo_model_are_the_float32_ones(repo_root, demo_run, tmp_path):
    """The demo's synthetic TESTING cases (256 x 256 slabs): per case Dice >= 0.99 and volumes within 1 %."""
    for amp in (True, False):
        demo_workflow(repo_root, demo_run, ["inference.json"], "infer", amp, tmp_path / str(amp))
    volumes = {amp: read_rows(tmp_path / str(amp) / "predictions" / "per_case.csv") for amp in (True, False)}
    assert len(volumes[False]) == 4 and volumes[True].keys() == volumes[False].keys()
    lesions = 0
    for case in volumes[False]:
        bf16, fp32 = (
            np.asanyarray(nib.load(tmp_path / str(amp) / "predictions" / "masks" / f"{case}.nii.gz").dataobj) > 0
            for amp in (True, False)
        )
        if fp32.any() or bf16.any():
            dice = 2 * (bf16 & fp32).sum() / (bf16.sum() + fp32.sum())
            assert dice >= 0.99, (case, dice)
        lesions += fp32.any()
        v_bf16, v_fp32 = (float(volumes[amp][case]["volume_pred_ml"]) for amp in (True, False))
        assert v_bf16 == pytest.approx(v_fp32, rel=0.01, abs=1e-6), case
    assert lesions >= 2, "the demo model finds lesions, so the comparison means something"


def test_bf16_evaluation_metrics_are_the_float32_ones(repo_root, demo_run, tmp_path):
    for amp in (True, False):
        demo_workflow(repo_root, demo_run, ["inference.json", "evaluate.json"], "infer", amp, tmp_path / str(amp))
    rows = {amp: read_rows(tmp_path / str(amp) / "eval" / "per_case.csv") for amp in (True, False)}
    assert rows[True].keys() == rows[False].keys() and rows[False]
    for case, fp32 in rows[False].items():
        assert float(rows[True][case]["dice"]) == pytest.approx(float(fp32["dice"]), abs=0.005), case


@pytest.mark.parametrize("native, setting, timed", [(True, "auto", 2), (False, "auto", 1), (False, "true", 2)])
def test_the_benchmark_times_bf16_only_where_it_is_native_unless_asked(monkeypatch, native, setting, timed):
    """benchmarks/run.py leaves the bfloat16 rows out on a CPU that emulates it (one conv3d there takes minutes)."""
    from benchmarks.run import measured_precisions

    monkeypatch.setenv(NATIVE_BF16_ENV, str(native).lower())
    assert measured_precisions(setting) == ("fp32", "bf16")[:timed]
