"""Which device to run on, what it is, and how fast it really is.

* :func:`resolve_device` turns a user's ``--device`` string into a :class:`torch.device`, or a
  one-line :class:`~workbench.errors.WorkbenchError` that lists what is available.
* :func:`detect` describes the machine (:class:`HardwareInfo`); its :meth:`HardwareInfo.stamp` is
  the ``"hardware"`` object written into every benchmark JSON, so numbers stay tied to a machine.
* :func:`measure_bandwidth` and :func:`measure_matmul_peak` measure the two numbers of the roofline
  model, and :func:`measure_roofline` combines them into a :class:`~workbench.roofline.Roofline`.

Measured, not datasheet, numbers: what a plain ``copy_`` and a plain ``matmul`` achieve here is the
fair yardstick for the rest of the workbench. Notebook ``00_tour`` teaches the roofline with them.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.roofline import Roofline

__all__ = ["GpuInfo", "HardwareInfo", "Roofline", "detect", "measure_bandwidth",
           "measure_matmul_peak", "measure_roofline", "resolve_device"]

_MIB = 1 << 20


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _available_names() -> list[str]:
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` into a :class:`torch.device`.

    ``"auto"`` picks CUDA when present, else the CPU. Anything unknown or not present on this
    machine raises :class:`WorkbenchError` naming the devices that are available.
    """
    text = str(name).strip().lower()
    available = ", ".join(_available_names())
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise WorkbenchError(f"device 'mps' is not available on this machine; available: {available}")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise WorkbenchError(
                f"device {text!r} requested but CUDA is not available (torch {torch.__version__}); "
                f"available: {available}"
            )
        if text == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        index = text.split(":", 1)[1]
        count = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise WorkbenchError(
                f"device {text!r} does not exist: this machine has {count} CUDA device(s); "
                f"available: {available}"
            )
        return torch.device("cuda", int(index))
    raise WorkbenchError(f"unknown device {str(name)!r}; available: {available}")


def _as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device as torch sees it."""

    index: int
    name: str
    memory_bytes: int
    compute_capability: str  # e.g. "9.0" for Hopper


@dataclass(frozen=True)
class HardwareInfo:
    """A snapshot of the machine and software a measurement ran on (see :func:`detect`)."""

    device: str  # the chosen device, e.g. "cpu" or "cuda:0"
    cpu_name: str
    logical_cores: int
    torch_threads: int
    total_ram_bytes: int | None
    gpus: tuple[GpuInfo, ...]
    torch_version: str
    transformers_version: str | None
    python_version: str
    platform: str

    def _chosen_gpu(self) -> GpuInfo | None:
        dev = torch.device(self.device)
        if dev.type != "cuda":
            return None
        return next((g for g in self.gpus if g.index == (dev.index or 0)), None)

    @property
    def device_name(self) -> str:
        """Model name of the chosen device: the GPU's for ``cuda:N``, else the CPU's."""
        gpu = self._chosen_gpu()
        if gpu is not None:
            return gpu.name
        if torch.device(self.device).type == "mps":
            return f"Apple MPS ({self.cpu_name})"
        return self.cpu_name

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (the GPU tuple becomes a list of dicts)."""
        data = asdict(self)
        data["gpus"] = [asdict(gpu) for gpu in self.gpus]
        return data

    def stamp(self) -> dict[str, Any]:
        """The compact ``"hardware"`` object for benchmark JSONs.

        ``device`` is the model name of the chosen device; ``num_devices`` is the number of GPUs when
        running on CUDA, else 1.
        """
        gpu = self._chosen_gpu()
        return {
            "device": self.device_name,
            "device_type": torch.device(self.device).type,
            "num_devices": len(self.gpus) if gpu is not None else 1,
            "gpu_memory_bytes": gpu.memory_bytes if gpu is not None else None,
            "compute_capability": gpu.compute_capability if gpu is not None else None,
            "cpu": self.cpu_name,
            "logical_cores": self.logical_cores,
            "torch_threads": self.torch_threads,
            "ram_bytes": self.total_ram_bytes,
            "torch": self.torch_version,
            "transformers": self.transformers_version,
            "python": self.python_version,
        }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _total_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _gpus() -> tuple[GpuInfo, ...]:
    if not torch.cuda.is_available():
        return ()
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(GpuInfo(i, p.name, int(p.total_memory), f"{p.major}.{p.minor}"))
    return tuple(gpus)


def detect(device: str | torch.device = "auto") -> HardwareInfo:
    """Describe this machine and the chosen ``device`` (cheap: no benchmarks are run)."""
    dev = _as_device(device)
    try:
        transformers_version: str | None = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers_version = None
    return HardwareInfo(
        device=str(dev),
        cpu_name=_cpu_name(),
        logical_cores=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        total_ram_bytes=_total_ram_bytes(),
        gpus=_gpus(),
        torch_version=torch.__version__,
        transformers_version=transformers_version,
        python_version=platform.python_version(),
        platform=platform.platform(),
    )


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` on ``device``, after ``warmup`` untimed calls.

    GPU work is asynchronous, so on CUDA we time with events recorded on the stream and wait for
    them; elsewhere we synchronise (MPS) and use ``time.perf_counter``.
    """
    if repeats < 1:
        raise WorkbenchError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)  # ms -> s
    else:
        sync = torch.mps.synchronize if device.type == "mps" else (lambda: None)
        sync()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    return max(statistics.median(times), 1e-9)


def measure_bandwidth(
    device: str | torch.device = "cpu",
    nbytes: int | None = None,
    repeats: int = 5,
    quick: bool = False,
) -> float:
    """Effective memory bandwidth in bytes/s: ``2 * nbytes / median(time of dst.copy_(src))``.

    A copy reads ``nbytes`` and writes ``nbytes``, so both count. Defaults: 256 MiB on CPU, 1 GiB
    on GPU (large enough to defeat the caches). ``quick=True`` uses 8 MiB and 3 repeats for tests:
    that mostly fits in cache, so it overstates DRAM bandwidth.
    """
    dev = _as_device(device)
    if nbytes is None:
        nbytes = 8 * _MIB if quick else (1024 * _MIB if dev.type == "cuda" else 256 * _MIB)
        repeats = 3 if quick else repeats
    if nbytes < 1:
        raise WorkbenchError(f"nbytes must be >= 1, got {nbytes}")
    src = torch.ones(nbytes, dtype=torch.uint8, device=dev)  # touched, so pages are really mapped
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), dev, repeats, warmup=2)
    return 2 * nbytes / seconds


def measure_matmul_peak(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    n: int | None = None,
    repeats: int = 5,
    quick: bool = False,
) -> float:
    """Achieved matmul speed in FLOP/s: ``2 * n**3 / median(time of a @ b)`` for ``n x n`` inputs.

    Default dtype is fp32 on CPU and bf16 on GPUs (what inference uses, and what tensor cores
    run). Default ``n``: 1024 on CPU, 8192 on CUDA, 2048 on MPS; ``quick=True`` uses 256.
    """
    dev = _as_device(device)
    if dtype is None:  # pre-Ampere GPUs (e.g. a T4) lack bf16 tensor cores: use fp16 there
        bf16_ok = dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] >= 8
        dtype = torch.float32 if dev.type == "cpu" else (torch.bfloat16 if bf16_ok else torch.float16)
    if n is None:
        n = 256 if quick else {"cuda": 8192, "mps": 2048}.get(dev.type, 1024)
        repeats = 3 if quick else repeats
    if n < 1:
        raise WorkbenchError(f"n must be >= 1, got {n}")
    gen = torch.Generator(device=dev).manual_seed(0)  # own generator: global RNG state untouched
    a, b, out = (torch.empty(n, n, device=dev, dtype=dtype) for _ in range(3))
    a.uniform_(-1, 1, generator=gen)
    b.uniform_(-1, 1, generator=gen)
    seconds = _median_seconds(lambda: torch.matmul(a, b, out=out), dev, repeats, warmup=2)
    return 2 * n**3 / seconds


def measure_roofline(device: str | torch.device = "auto", quick: bool = False) -> Roofline:
    """Measure bandwidth and matmul peak on ``device`` and return the :class:`Roofline` they define."""
    dev = _as_device(device)
    bandwidth = measure_bandwidth(dev, quick=quick)
    peak = measure_matmul_peak(dev, quick=quick)
    if not (math.isfinite(bandwidth) and math.isfinite(peak)):
        raise WorkbenchError(f"measurement on {dev} gave a non-finite result; try quick=False")
    return Roofline(bandwidth=bandwidth, peak_flops=peak, device_name=f"{detect(dev).device_name} ({dev})")
