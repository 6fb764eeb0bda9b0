"""The runtime that runs the network at inference: torch, or OpenVINO where it measures faster on a CPU.

OpenVINO (``pip install openvino``, an optional dependency) runs the exported network with its own CPU kernels; on
CPUs with native bfloat16 its bfloat16 forward of the paper-size network is faster than torch's
(benchmarks/README.md, "Inference runtimes"). ``backend`` ``auto`` picks it there when it is installed, and torch
otherwise; the log says which runs and why. The network is exported once per network, weights and input shape
(``torch.export``, then ``openvino.convert_model``) and compiled once per input shape, so ensembles, test-time
mirroring and sliding windows run through it unchanged: only the network's forward moves.

The conversion takes seconds, more than the forward of a small network: it is paid once per machine, not per run.
The converted model is kept on disk (OpenVINO's IR, ``openvino.save_model``) in a cache folder (configs/inference.json
``openvino_cache_dir``, default :func:`default_cache_dir`, outside the bundle), one entry per network class and
configuration, weights, input shape, OpenVINO and torch versions (:func:`cache_key`); beside it OpenVINO's own cache
of compiled networks (its ``CACHE_DIR``). An entry is written whole (a temporary folder renamed into place) with the
SHA-256 of its files; one that is missing a file or does not match them (a partial or corrupt entry) is ignored,
removed and converted again, with a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
import weakref

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from scripts.safe_files import write_atomically

__all__ = [
    "BACKENDS",
    "OpenVinoInferer",
    "OpenVinoNetwork",
    "cache_key",
    "choose_backend",
    "converted_model",
    "default_cache_dir",
    "openvino_version",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino")
OPENVINO_PRECISIONS = {False: "f32", True: "bf16"}  # amp off / on: OpenVINO's INFERENCE_PRECISION_HINT
CACHE_NAME = os.path.join("isles_ctp_segmentation", "openvino")  # under the user's cache folder
MODEL_FILES = ("model.xml", "model.bin")  # one cache entry: the IR, and the SHA-256 of each file in DIGESTS
DIGESTS = "sha256.json"
# OpenVINO's CACHE_DIR, inside the cache folder: compiled/<precision>. Its key leaves out the precision: OpenVINO
# 2026.4.1 imported a network compiled in f32 for a bf16 compile, and ran it wrong (Dice 0.73 against torch).
COMPILED = "compiled"
STALE_PARTIAL_S = 3600.0  # a temporary entry folder untouched this long was left by a killed store: removed


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


def default_cache_dir() -> str:
    """The default cache folder of converted networks: ``isles_ctp_segmentation/openvino`` in the user's cache folder
    (``$XDG_CACHE_HOME``, else ``~/.cache``), outside the bundle, so that a read-only bundle runs as fast."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, CACHE_NAME)


def cache_key(network: torch.nn.Module, shape) -> str:
    """What determines a converted network, as one SHA-256: the network's class and configuration (its module
    ``repr``), each weight's name, dtype, shape and bytes, the input shape it is exported at, and the OpenVINO and
    torch versions that convert it.

    Args:
        network: the torch network.
        shape: the input shape, batch and channels included.
    """
    digest = hashlib.sha256()
    kind = type(network)
    setup = (kind.__module__, kind.__qualname__, repr(network), list(shape), openvino_version(), torch.__version__)
    digest.update(repr(setup).encode())
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(repr((name, str(tensor.dtype), list(tensor.shape))).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _discard(entry: str) -> None:
    """Remove a cache entry: first renamed aside (a reader never sees it half removed), then deleted."""
    aside = f"{entry}.{os.getpid()}.stale"
    try:
        os.rename(entry, aside)
    except OSError:
        return  # gone already (another process removed it)
    shutil.rmtree(aside, ignore_errors=True)


def _read_entry(entry: str):
    """The OpenVINO model of cache ``entry``, or None where there is none; an entry whose files are missing or differ
    from their recorded SHA-256 is removed (and None returned) with a warning."""
    if not os.path.isdir(entry):
        return None
    try:
        with open(os.path.join(entry, DIGESTS)) as f:
            expected = json.load(f)
        for name in MODEL_FILES:
            if _file_sha256(os.path.join(entry, name)) != expected[name]:
                raise ValueError(f"{name} does not match its SHA-256")
        return _core().read_model(os.path.join(entry, MODEL_FILES[0]))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        logger.warning("OpenVINO: cache entry %s is partial or corrupt (%s): removed, converting again", entry, error)
        _discard(entry)
        return None


def _remove_stale_partials(folder: str) -> None:
    """Remove the temporary entry folders (``.<key>.*.partial``) that a store killed before its rename left in
    ``folder``: those untouched for ``STALE_PARTIAL_S``, so that one another process is writing stays."""
    now = time.time()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(".") and name.endswith(".partial") and now - os.path.getmtime(path) > STALE_PARTIAL_S:
            shutil.rmtree(path, ignore_errors=True)


def _store_entry(model, entry: str) -> bool:
    """Write ``model`` as cache ``entry``, whole: the IR and its SHA-256 in a temporary folder beside it, flushed to
    disk, then renamed into place; False (and the reason logged) where the folder cannot be written. Another process
    that stored the same entry first keeps its own."""
    import openvino

    folder, key = os.path.split(entry)
    partial = None
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale_partials(folder)
        partial = tempfile.mkdtemp(prefix=f".{key}.", suffix=".partial", dir=folder)
        openvino.save_model(model, os.path.join(partial, MODEL_FILES[0]), compress_to_fp16=False)
        digests = {name: _file_sha256(os.path.join(partial, name)) for name in MODEL_FILES}
        for name in MODEL_FILES:
            with open(os.path.join(partial, name), "rb+") as f:
                os.fsync(f.fileno())
        write_atomically(os.path.join(partial, DIGESTS), lambda f: f.write(json.dumps(digests, indent=4).encode()))
        try:
            os.rename(partial, entry)
        except OSError:
            if not os.path.isdir(entry):
                raise
            logger.info("OpenVINO: cache entry %s was stored by another process meanwhile", entry)
        return True
    except (OSError, RuntimeError) as error:  # RuntimeError: OpenVINO's save_model
        logger.warning("OpenVINO: the converted network could not be cached in %s (%s)", folder, error)
        return False
    finally:
        if partial is not None and os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)


def converted_model(network: torch.nn.Module, example: torch.Tensor, cache_dir: str | None = None):
    """``network`` as an OpenVINO model for inputs of ``example``'s shape: read from ``cache_dir`` where it holds this
    network, weights, shape and versions (:func:`cache_key`), else exported (``torch.export`` on ``example``, then
    ``openvino.convert_model``) and stored there. Which of the two happened is logged.

    Args:
        network: the torch network, in eval mode, with the weights it will run with.
        example: an input of the shape the model will run on.
        cache_dir: the cache folder; None: no cache (converted every time).
    """
    import openvino

    entry = None if cache_dir is None else os.path.join(cache_dir, cache_key(network, example.shape))
    model = None if entry is None else _read_entry(entry)
    if model is not None:
        logger.info("OpenVINO: network for input %s read from the cache %s", list(example.shape), entry)
        return model
    with torch.no_grad():
        exported = torch.export.export(network, (example,))
    with warnings.catch_warnings():  # torch's run_decompositions, called by OpenVINO, copies a LeafSpec
        warnings.filterwarnings("ignore", "`isinstance\\(treespec, LeafSpec\\)` is deprecated", FutureWarning)
        model = openvino.convert_model(exported)
    if entry is None or not _store_entry(model, entry):
        logger.info("OpenVINO: network converted for input %s", list(example.shape))
        return model
    logger.info("OpenVINO: network converted for input %s, cached in %s", list(example.shape), entry)
    return _read_entry(entry) or model  # as a later process reads it: OpenVINO's compiled cache then has one entry


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t`` (sigaltstack(2))."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def signal_stack_kept():
    """Inside, OpenVINO may change this thread's alternate signal stack; on leaving, the one it had is put back.

    OpenVINO 2026.4's CPU plugin gives the thread that compiles a network an alternate signal stack of 11.5 KB and
    puts back the one it found when the network's runtime is freed. Freed in another order than compiled (two
    ``openvino.Core`` objects), the thread is left with a stack in freed memory, and the next signal handled on it
    kills the process with SIGSEGV: Python's signal handlers run on the alternate stack, e.g. the SIGCHLD handler of a
    DataLoader whose workers exit (seen as a crash of benchmarks/run.py after its OpenVINO peers). On CPUs with AMX
    the signal frame alone fills 11.5 KB. OpenVINO installs no signal handler of its own that would need the stack.
    """
    if sys.platform != "linux":
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _SignalStack()
    libc.sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(before), None)


@functools.cache
def _core():
    """One OpenVINO runtime per process."""
    import openvino

    return openvino.Core()


class OpenVinoNetwork:
    """A network's forward run by OpenVINO: called as the network is (a batch in, logits out, float32).

    At the first input of each shape the network is converted (:func:`converted_model`: from the cache folder where
    it holds it) and compiled, once; OpenVINO keeps its compiled network in the cache folder too, so that a later
    process compiles it faster. Inputs and outputs are torch tensors; a ``MetaTensor`` input gives a ``MetaTensor``
    output with the input's metadata, as the network gives.

    Args:
        network: the torch network, in eval mode, with the weights it will run with.
        precision: OpenVINO's ``INFERENCE_PRECISION_HINT``: ``bf16`` or ``f32``.
        cache_dir: the cache folder (:func:`default_cache_dir`); None: none (converted and compiled in every process).
    """

    def __init__(self, network: torch.nn.Module, precision: str, cache_dir: str | None = None):
        self.network, self.precision, self.cache_dir = network, precision, cache_dir
        self.compiled: dict[tuple[int, ...], object] = {}

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        x = x.detach().to("cpu", torch.float32).contiguous()
        shape = tuple(x.shape)
        if shape not in self.compiled:
            self.compiled[shape] = self._compile(x)
        with signal_stack_kept():
            outputs = torch.from_numpy(np.asarray(self.compiled[shape](x.numpy())[0]))
        if isinstance(inputs, MetaTensor):
            return MetaTensor(outputs, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return outputs

    def _compile(self, example: torch.Tensor):
        model = converted_model(self.network, example, self.cache_dir)
        model.reshape(list(example.shape))  # the spatial sizes, open in the converted model, fixed for compiling
        settings = {"INFERENCE_PRECISION_HINT": self.precision}
        usable = self.cache_dir is not None and os.path.isdir(self.cache_dir) and os.access(self.cache_dir, os.W_OK)
        if usable:  # OpenVINO's own cache of compiled networks, one folder per precision (see COMPILED)
            settings["CACHE_DIR"] = os.path.join(self.cache_dir, COMPILED, self.precision)
        logger.info("OpenVINO: network compiled for input %s, precision %s", list(example.shape), self.precision)
        with signal_stack_kept():
            return _core().compile_model(model, "CPU", settings)


class OpenVinoInferer(Inferer):
    """Runs ``inferer`` with each network's forward in OpenVINO (:class:`OpenVinoNetwork`).

    One OpenVINO network per torch network and weights: a network whose parameters or buffers changed in place since
    (a checkpoint loaded into it, an optimizer step) is converted again (or read from the cache folder). A network in
    training mode runs in torch.

    Args:
        inferer: the inferer to run, e.g. ``SimpleInferer()``, ``FlipInferer()`` or ``SlidingWindowInferer()``.
        precision: OpenVINO's ``INFERENCE_PRECISION_HINT``: ``bf16`` or ``f32``.
        cache_dir: the cache folder of converted networks (:func:`default_cache_dir`); None: none.
    """

    def __init__(self, inferer: Inferer, precision: str = "bf16", cache_dir: str | None = None):
        super().__init__()
        self.inferer, self.precision, self.cache_dir = inferer, precision, cache_dir
        self.networks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if isinstance(network, torch.nn.Module) and not network.training:
            weights = tuple(t._version for t in network.state_dict(keep_vars=True).values())
            known = self.networks.get(network)
            if known is None or known[0] != weights:
                known = self.networks[network] = (weights, OpenVinoNetwork(network, self.precision, self.cache_dir))
            network = known[1]
        return self.inferer(inputs, network, *args, **kwargs)
