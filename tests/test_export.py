"""Export and metadata checks through the real `python -m monai.bundle ...` commands of docs/multi_gpu_and_export.md."""

import copy
import json
import os
import subprocess
import sys
import warnings

import jsonschema
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from monai.data import load_net_with_metadata
from scripts.engine.networks import ModifiedUNet

FEATURES = [2, 4, 8, 16, 32]  # tiny, so the commands run fast; `--features` overrides train.json's as in training
CONFIG = ["--meta_file", "configs/metadata.json", "--config_file", "configs/train.json", "--features", str(FEATURES)]
ONNX_AXES = (
    "{'input_names': ['image'], 'output_names': ['pred'], 'dynamic_axes': "
    "{'image': {0: 'batch', 2: 'x', 3: 'y', 4: 'z'}, 'pred': {0: 'batch', 2: 'x', 3: 'y', 4: 'z'}}}"
)
SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "meta_schema_20240725.json")
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"  # verify_metadata checks the file against it (else it warns it cannot)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """A network with non-trivial weights, saved as `models/model.pt` is (a plain state_dict), in eval mode."""
    torch.manual_seed(0)
    net = ModifiedUNet(features=FEATURES)
    for p in net.parameters():  # away from the init values (e.g. norm weights of exactly 1)
        p.data.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("export") / "model.pt"
    torch.save(net.state_dict(), path)
    return net.eval(), path


@pytest.fixture(scope="module")
def bundle(repo_root, eager):
    """The doc's four `python -m monai.bundle` commands, started together (they are independent; this halves the
    wait on a 2-core machine). ``bundle(name)`` is that command's combined output, after checking it succeeded."""
    ckpt = eager[1]
    commands = {
        # the model zoo's command (scripting), with inference.json as the zoo's verify_torchscript passes it
        "ckpt_export": [
            "ckpt_export",
            "network_def",
            "--filepath",
            str(ckpt.parent / "model.ts"),
            "--ckpt_file",
            str(ckpt),
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.json",
            "--features",
            str(FEATURES),
        ],
        "ckpt_export_trace": [
            "ckpt_export",
            "network_def",
            "--filepath",
            str(ckpt.parent / "model_traced.ts"),
            "--ckpt_file",
            str(ckpt),
            "--use_trace",
            "True",
            *CONFIG,
        ],
        "onnx_export": [
            "onnx_export",
            "network_def",
            "--filepath",
            str(ckpt.parent / "model.onnx"),
            "--ckpt_file",
            str(ckpt),
            "--converter_kwargs",
            ONNX_AXES,
            *CONFIG,
        ],
        "verify_net_in_out": ["verify_net_in_out", "network_def", "--device", "cpu", *CONFIG],
        "verify_metadata": [
            "verify_metadata",
            "--meta_file",
            "configs/metadata.json",
            "--filepath",
            SCHEMA,
            "--hash_val",
            SCHEMA_MD5,
        ],
    }
    logs = {name: ckpt.parent / f"{name}.log" for name in commands}  # files, not pipes: no process blocks on output
    running = {}
    for name, args in commands.items():
        with open(logs[name], "w") as log:
            running[name] = subprocess.Popen(
                [sys.executable, "-m", "monai.bundle", *args],
                cwd=repo_root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TMPDIR": str(ckpt.parent)},  # torch's ONNX export leaves a tmp*.data file there
            )
    outputs = {name: (proc.wait(timeout=300), logs[name].read_text()) for name, proc in running.items()}

    def output(name):
        returncode, text = outputs[name]
        assert returncode == 0, text[-6000:]
        return text

    return output


def random_inputs(meta):
    """The metadata's input shape with batch 1, and a different batch and spatial size."""
    image = meta["network_data_format"]["inputs"]["image"]
    torch.manual_seed(1)
    channels = image["num_channels"]
    return [torch.rand(1, channels, *image["spatial_shape"]), torch.rand(2, channels, 32, 32, 16)]


@pytest.fixture(scope="module")
def meta(repo_root):
    with open(os.path.join(repo_root, "configs", "metadata.json")) as f:
        return json.load(f)


@pytest.mark.parametrize(
    "command, file, config",
    [("ckpt_export", "model.ts", "inference.json"), ("ckpt_export_trace", "model_traced.ts", "train.json")],
    ids=["scripted", "traced"],
)
def test_torchscript_export_matches_eager(bundle, eager, meta, command, file, config):
    net, ckpt = eager
    bundle(command)
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.load, which MONAI's loader of the zoo's .ts uses
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
        ts_net, ts_meta, extras = load_net_with_metadata(str(ckpt.parent / file), more_extra_files=[config])
    assert ts_meta["network_data_format"] == meta["network_data_format"]
    assert json.loads(extras[config])["network_def"]["_target_"] == "scripts.engine.networks.ModifiedUNet"
    with torch.no_grad():
        for x in random_inputs(meta):
            torch.testing.assert_close(ts_net(x), net(x), rtol=1e-5, atol=1e-5)
    if command == "ckpt_export":  # the input-size check is compiled in with the scripted forward
        with pytest.raises(torch.jit.Error, match="spatial size \\[32, 32, 15\\] must be divisible by 16"):
            ts_net(torch.rand(1, 5, 32, 32, 15))


def test_onnx_export_matches_eager(bundle, eager, meta):
    net, ckpt = eager
    bundle("onnx_export")
    onnx_file = ckpt.parent / "model.onnx"
    onnx.checker.check_model(onnx.load(str(onnx_file)))
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["pred"]
    with torch.no_grad():
        for x in random_inputs(meta):
            (pred,) = session.run(None, {"image": x.numpy()})
            expected = net(x).numpy()
            assert pred.shape == expected.shape
            np.testing.assert_allclose(pred, expected, rtol=1e-4, atol=1e-4)


def test_verify_net_in_out_passes(bundle):
    assert "data shape of network is verified with no error" in bundle("verify_net_in_out")


def test_metadata_is_valid_offline(bundle):
    """MONAI's own `verify_metadata`: the schema file exists, so nothing is downloaded."""
    out = bundle("verify_metadata")
    assert "skipped downloading" in out and "metadata is verified with no error" in out
    assert f"Verified 'meta_schema_20240725.json', md5: {SCHEMA_MD5}" in out and "NOT verified" not in out


@pytest.mark.parametrize(
    "path, value",
    [
        (("network_data_format",), None),
        (("required_packages_version",), None),
        (("network_data_format", "inputs", "image", "num_channels"), "5"),
        (("network_data_format", "outputs", "pred", "value_range"), None),
        (("version",), 1.0),
    ],
    ids=["no_io_format", "no_packages", "channels_as_text", "no_value_range", "version_as_number"],
)
def test_the_zoo_schema_rejects_broken_metadata(meta, path, value):
    broken = copy.deepcopy(meta)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with open(SCHEMA) as f:
        schema = json.load(f)
    jsonschema.validate(meta, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
