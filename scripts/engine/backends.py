"""The runtime that runs the network at inference: torch, or OpenVINO where it measures faster on a CPU.

OpenVINO (``pip install openvino``, an optional dependency) runs the exported network with its own CPU kernels; on
CPUs with native bfloat16 its bfloat16 forward of the paper-size network is faster than torch's
(benchmarks/README.md, "Inference runtimes"). ``backend`` ``auto`` picks it there when it is installed, and torch
otherwise; the log says which runs and why. The network is exported once per network and weights (``torch.export``,
then ``openvino.convert_model``) and compiled once per input shape, so ensembles, test-time mirroring and sliding
windows run through it unchanged: only the network's forward moves.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import warnings
import weakref

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

__all__ = ["BACKENDS", "OpenVinoInferer", "OpenVinoNetwork", "choose_backend", "openvino_version"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
OPENVINO_PRECISIONS = {False: "f32", True: "bf16"}  # amp off / on: OpenVINO's INFERENCE_PRECISION_HINT


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None where it is not installed."""
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return None


def choose_backend(backend: str, amp: bool, device, native_bf16: bool) -> tuple[str, str]:
    """The runtime of inference, and why.

    ``auto`` picks OpenVINO on a CPU with native bfloat16 running ``amp`` (bfloat16) when OpenVINO is installed, the
    one case where it measured faster than torch (benchmarks/README.md); torch elsewhere: on CUDA, in float32 (torch
    measured as fast or faster there), and where bfloat16 would be emulated.

    Args:
        backend: ``auto``, ``torch`` or ``openvino``.
        amp: bfloat16 (True) or float32.
        device: the ``device`` id.
        native_bf16: whether the CPU computes bfloat16 in hardware (``inferers.cpu_has_native_bf16``).

    Returns:
        ``("torch" or "openvino", the reason, for the log)``.

    Raises:
        ValueError: an unknown ``backend``; ``openvino`` asked for on a non-CPU device or without OpenVINO installed.
    """
    backend = str(backend).strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cpu = torch.device(device).type == "cpu"
    version = openvino_version()
    if backend == "openvino":
        if not on_cpu:
            raise ValueError(f"backend openvino runs on the CPU only, and device is {device}")
        if version is None:
            raise ValueError("backend openvino: OpenVINO is not installed (pip install openvino)")
        return "openvino", f"asked for (OpenVINO {version})"
    if backend == "torch":
        return "torch", "asked for"
    if not on_cpu:
        return "torch", f"device {device}"
    if version is None:
        return "torch", "OpenVINO is not installed (pip install openvino: faster in bfloat16 on CPUs that have it)"
    if not amp:
        return "torch", "float32 (amp false): OpenVINO runs bfloat16 only"
    if not native_bf16:
        return "torch", "bfloat16 is emulated on this CPU"
    return "openvino", f"OpenVINO {version} installed, CPU with native bfloat16"


@functools.cache
def _core():
    """One OpenVINO runtime per process."""
    import openvino

    return openvino.Core()


class OpenVinoNetwork:
    """A network's forward run by OpenVINO: called as the network is (a batch in, logits out, float32).

    The network is exported at the first call (``torch.export`` on that input, then ``openvino.convert_model``, which
    keeps the spatial sizes open) and compiled for each input shape it meets, once. Inputs and outputs are torch
    tensors; a ``MetaTensor`` input gives a ``MetaTensor`` output with the input's metadata, as the network gives.

    Args:
        network: the torch network, in eval mode, with the weights it will run with.
        precision: OpenVINO's ``INFERENCE_PRECISION_HINT``: ``bf16`` or ``f32``.
    """

    def __init__(self, network: torch.nn.Module, precision: str):
        self.network, self.precision = network, precision
        self.model = None
        self.compiled: dict[tuple[int, ...], object] = {}

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        x = x.detach().to("cpu", torch.float32).contiguous()
        shape = tuple(x.shape)
        if shape not in self.compiled:
            self.compiled[shape] = self._compile(x)
        outputs = torch.from_numpy(np.asarray(self.compiled[shape](x.numpy())[0]))
        if isinstance(inputs, MetaTensor):
            return MetaTensor(outputs, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return outputs

    def _compile(self, example: torch.Tensor):
        import openvino

        if self.model is None:
            with torch.no_grad():
                exported = torch.export.export(self.network, (example,))
            with warnings.catch_warnings():  # torch's run_decompositions, called by OpenVINO, copies a LeafSpec
                warnings.filterwarnings("ignore", "`isinstance\\(treespec, LeafSpec\\)` is deprecated", FutureWarning)
                self.model = openvino.convert_model(exported)
        model = self.model.clone()
        model.reshape(list(example.shape))
        logger.info("OpenVINO: network compiled for input %s, precision %s", list(example.shape), self.precision)
        return _core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.precision})


class OpenVinoInferer(Inferer):
    """Runs ``inferer`` with each network's forward in OpenVINO (:class:`OpenVinoNetwork`).

    One OpenVINO network per torch network and weights: a network whose parameters or buffers changed in place since
    (a checkpoint loaded into it, an optimizer step) is exported again. A network in training mode runs in torch.

    Args:
        inferer: the inferer to run, e.g. ``SimpleInferer()``, ``FlipInferer()`` or ``SlidingWindowInferer()``.
        precision: OpenVINO's ``INFERENCE_PRECISION_HINT``: ``bf16`` or ``f32``.
    """

    def __init__(self, inferer: Inferer, precision: str = "bf16"):
        super().__init__()
        self.inferer, self.precision = inferer, precision
        self.networks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if isinstance(network, torch.nn.Module) and not network.training:
            weights = tuple(t._version for t in network.state_dict(keep_vars=True).values())
            known = self.networks.get(network)
            if known is None or known[0] != weights:
                known = self.networks[network] = (weights, OpenVinoNetwork(network, self.precision))
            network = known[1]
        return self.inferer(inputs, network, *args, **kwargs)
