"""The bundle's inferers: test-time mirroring, and bfloat16 autocast on the CPU.

MONAI's ``TestTimeAugmentation`` draws random transforms on dictionaries to estimate uncertainty; there is no
inferer that averages the fixed set of mirror images, which is what nnU-Net does at test time. MONAI's engines
autocast for CUDA only (``scripts.monai_gaps``); the inferer is where the bundle runs the network in bfloat16 on CPUs
that compute it in hardware.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import warnings

import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from scripts.engine.backends import OPENVINO_PRECISIONS, OpenVinoInferer, choose_backend
from scripts.flags import as_bool
from scripts.monai_gaps import CpuAutocastInferer

__all__ = ["FlipInferer", "amp_default", "cpu_has_native_bf16", "make_inferer"]

# /proc/cpuinfo flags of bfloat16 arithmetic in hardware: x86 AVX512-BF16 and AMX-BF16, Arm's BF16 extension
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
# Set to true/false, this environment variable replaces the CPU-flag detection (tests, or a CPU Linux misreports)
NATIVE_BF16_ENV = "ISLES_CPU_NATIVE_BF16"

logger = logging.getLogger(__name__)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86: AVX512-BF16 or AMX-BF16; Arm: the BF16 extension), as
    Linux's ``cpuinfo`` lists its flags; False where it cannot tell (other systems). Elsewhere oneDNN emulates
    bfloat16, which is slower than float32. The environment variable ``ISLES_CPU_NATIVE_BF16`` (true or false), when
    set, is the answer instead of the flags."""
    if os.environ.get(NATIVE_BF16_ENV, "").strip():
        return as_bool(os.environ[NATIVE_BF16_ENV], NATIVE_BF16_ENV)
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.lower().startswith(("flags", "features")) for word in line.split()}
    except OSError:
        return False
    return bool(flags & NATIVE_BF16_FLAGS)


def amp_default() -> bool:
    """The default of the ``amp`` id of inference and evaluation: on with CUDA, and on a CPU with native bfloat16."""
    return torch.cuda.is_available() or cpu_has_native_bf16()


def make_inferer(
    tta_flips=False, amp=False, device="cpu", sliding_window_size=None, backend="torch", openvino_cache_dir=None
) -> Inferer:
    """The inferer of training, evaluation and inference.

    Args:
        tta_flips: average over the 8 mirror images (``FlipInferer``), else one pass.
        amp: mixed precision; on a CPU ``device`` the network then runs in bfloat16: in OpenVINO (``backend``), or
            under ``CpuAutocastInferer`` (on CUDA, MONAI's engines autocast themselves).
        device: the ``device`` id.
        sliding_window_size: None: the network sees the whole (resized) volume (MONAI's ``SimpleInferer``); a size:
            MONAI's ``SlidingWindowInferer`` over windows of that size, half overlapping, blended with Gaussian
            weights (as nnU-Net), for volumes kept at their resolution (``target_spacing``).
        backend: the runtime of the network's forward: ``torch``, ``openvino`` (``OpenVinoInferer``) or ``auto``
            (the faster one on this CPU, ``scripts.engine.backends.choose_backend``); the choice is logged.
        openvino_cache_dir: where OpenVINO keeps the converted network (``backends.default_cache_dir``); None: no
            cache, the network converted in every run.

    Returns:
        The inferer.
    """
    one_pass = (
        SimpleInferer()
        if sliding_window_size is None
        else SlidingWindowInferer(roi_size=list(sliding_window_size), sw_batch_size=1, overlap=0.5, mode="gaussian")
    )
    inferer = FlipInferer(inferer=one_pass) if as_bool(tta_flips, "tta_flips") else one_pass
    amp = as_bool(amp, "amp")
    cpu = torch.device(device).type == "cpu"
    native = cpu_has_native_bf16() if cpu else False
    runtime, reason = choose_backend(backend, amp, device, native)
    if backend != "torch":
        logger.info("inference runs in %s: %s", runtime, reason)
    if amp and cpu and not native:
        warn_emulated_bf16()
    if runtime == "openvino":
        return OpenVinoInferer(inferer, OPENVINO_PRECISIONS[amp], openvino_cache_dir)
    if amp and cpu:
        inferer = CpuAutocastInferer(inferer)
    return inferer


@functools.cache
def warn_emulated_bf16() -> None:
    """Warn, once per process, that ``amp`` on this CPU runs bfloat16 emulated, slower than float32."""
    warnings.warn(
        "--amp true on a CPU without native bfloat16 (no AVX512-BF16, AMX or Arm BF16): bfloat16 runs emulated, "
        "several times slower than float32 (--amp false runs float32)",
        stacklevel=3,
    )


class FlipInferer(Inferer):
    """Test-time mirroring: logits of the mean softmax probability over the input and its mirror images along every
    combination of ``spatial_axes`` (0, 1, 2: x, y, z; 8 passes for all three), each prediction flipped back first.

    It returns logits, as the network does, so that everything after the inferer stays as it is for one pass: the
    returned logits are ``log(mean probability)``, whose softmax (``Activationsd(softmax=True)`` of the
    post-processing, the losses' ``softmax=True``) is exactly the mean probability, as nnU-Net averages its mirror
    images; an ensemble then averages those probabilities (``MeanEnsembled``). (Averaging the logits instead would
    weigh a confident pass more than a mean of probabilities does.)

    Args:
        spatial_axes: spatial axes to mirror along (the training augmentation flips all three).
        inferer: the inferer that runs each pass, default ``SimpleInferer()``.
    """

    def __init__(self, spatial_axes=(0, 1, 2), inferer: Inferer | None = None):
        super().__init__()
        axes = [int(a) for a in spatial_axes]
        self.flips = [list(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
        self.inferer = SimpleInferer() if inferer is None else inferer

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        log_probabilities = []
        for axes in self.flips:
            dims = [a + 2 for a in axes]  # inputs are (batch, channel, x, y, z)
            logits = self.inferer(torch.flip(inputs, dims), network, *args, **kwargs)
            log_probabilities.append(torch.log_softmax(torch.flip(logits, dims).float(), dim=1))
        # log of the mean probability, as logits: log(sum_i p_i / n) = logsumexp_i(log p_i) - log n
        return torch.logsumexp(torch.stack(log_probabilities), dim=0) - math.log(len(self.flips))
