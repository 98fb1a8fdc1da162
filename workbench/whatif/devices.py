"""A small table of real devices: memory bandwidth, dense FLOP/s, memory, interconnect.

The what-if predictor (:mod:`workbench.whatif.predict`) needs five numbers per device:

* ``bandwidth``: bytes/s between memory and the chip (decode reads every weight once per step);
* dense FLOP/s per compute dtype (``fp32``: plain FP32 units, as PyTorch runs an fp32 matmul by
  default, without TF32; ``bf16`` / ``fp16``: tensor cores with FP32 accumulation, *without*
  the 2:4 sparsity that datasheets quote in their largest numbers);
* ``memory_bytes``: what weights plus the KV cache must fit into;
* ``link_bandwidth`` (bytes/s, one direction, per device) and ``link_latency_s`` (the fixed cost
  of one small all-reduce) for tensor parallelism over ``max_devices`` devices of one host.

Datasheet numbers are peaks that real kernels do not reach (PyTorch's own matmul and copy reach
60-90% of them, notebook 00); :func:`this_machine` builds the same record from numbers *measured*
here (:func:`workbench.hardware.measure_roofline`), which is what notebook
``09_serving_capstone`` compares its predictions with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.roofline import Roofline

__all__ = ["COMPUTE_DTYPES", "DEVICES", "Device", "device", "match_device", "measure_this_machine",
           "this_machine"]

COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
_GB, _GiB, _T = 1e9, 2**30, 1e12


@dataclass(frozen=True)
class Device:
    """One accelerator (or CPU) as the roofline sees it; see the module docstring."""

    name: str
    bandwidth: float  # bytes/s
    memory_bytes: int
    fp32_flops: float | None  # dense FLOP/s; None: no figure for this dtype
    bf16_flops: float | None
    fp16_flops: float | None
    max_devices: int = 1  # devices one host holds: tensor parallelism up to this degree
    link_bandwidth: float | None = None  # bytes/s, one direction, per device (all-reduce)
    link_latency_s: float | None = None  # one small all-reduce (the fixed cost per call)
    source: str = ""

    def __post_init__(self) -> None:
        numbers = {"bandwidth": self.bandwidth, "memory_bytes": self.memory_bytes,
                   **{f"{d}_flops": getattr(self, f"{d}_flops") for d in COMPUTE_DTYPES},
                   "link_bandwidth": self.link_bandwidth, "link_latency_s": self.link_latency_s}
        for key, value in numbers.items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                          and value > 0):
                raise WorkbenchError(f"device {self.name!r}: {key} must be a finite number > 0, "
                                     f"got {value!r}")
        if self.bandwidth is None or self.memory_bytes is None:
            raise WorkbenchError(f"device {self.name!r} needs a bandwidth and a memory size")
        if all(getattr(self, f"{d}_flops") is None for d in COMPUTE_DTYPES):
            raise WorkbenchError(f"device {self.name!r} has no FLOP/s figure for any dtype")
        if not isinstance(self.max_devices, int) or self.max_devices < 1:
            raise WorkbenchError(f"device {self.name!r}: max_devices must be an integer >= 1")
        if self.max_devices > 1 and (self.link_bandwidth is None or self.link_latency_s is None):
            raise WorkbenchError(f"device {self.name!r}: several devices need link_bandwidth "
                                 "and link_latency_s (tensor parallelism all-reduces over them)")

    def peak_flops(self, compute: str) -> float:
        """Dense FLOP/s for matmuls in ``compute`` ("fp32", "bf16" or "fp16")."""
        if compute not in COMPUTE_DTYPES:
            raise WorkbenchError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {compute!r}")
        value = getattr(self, f"{compute}_flops")
        if value is None:
            have = [d for d in COMPUTE_DTYPES if getattr(self, f"{d}_flops") is not None]
            raise WorkbenchError(f"{self.name} has no {compute} FLOP/s figure (it has "
                                 f"{', '.join(have)}): compute in one of those")
        return float(value)

    def roofline(self, compute: str) -> Roofline:
        """The two-number model of one of these devices for matmuls in ``compute``."""
        return Roofline(self.bandwidth, self.peak_flops(compute), self.name)

    def allreduce_s(self, nbytes: float, tp: int) -> float:
        """Seconds of one all-reduce of ``nbytes`` over ``tp`` devices (ring algorithm):
        ``latency + 2 (tp - 1) / tp * nbytes / link_bandwidth``; 0 for ``tp == 1``."""
        if tp == 1:
            return 0.0
        if tp > self.max_devices:
            raise WorkbenchError(f"{self.name}: tensor parallelism {tp} needs {tp} devices; "
                                 f"the table allows at most {self.max_devices} on one host")
        return self.link_latency_s + 2 * (tp - 1) / tp * nbytes / self.link_bandwidth


# NVLink and PCIe all-reduce latencies are not datasheet figures. NVLink: measured on H200s when
# issue 5 was written (2026-11-27, quoted in the issue; no committed file holds them): an eager NCCL
# all-reduce of 8 KB-1 MB took 38-57 us on 2 and 4 GPUs, an 8 KB one 19 us inside a CUDA graph on 2
# GPUs; we take the CUDA-graph figure, as the predictor gives floors. PCIe cards: assumed twice
# that (40 us: traffic goes through the host's PCIe switch; an assumption, not a measurement).
_NVLINK_LATENCY = 19e-6
_PCIE_LATENCY = 40e-6

DEVICES: dict[str, Device] = {d.name: d for d in (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): HBM3 3.35 TB/s, 80 GB; FP32 67 TFLOPS;
    # BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity = 989 dense; NVLink 900 GB/s (both
    # directions: 450 GB/s each way); 8 GPUs per HGX H100 board.
    Device("H100 SXM 80GB", 3.35e12, 80 * _GiB, 67 * _T, 989 * _T, 989 * _T, 8, 450 * _GB,
           _NVLINK_LATENCY, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): HBM3e 4.8 TB/s, 141 GB; compute as the H100
    # SXM (FP32 67 TFLOPS, BF16/FP16 1,979 sparse = 989 dense); NVLink 900 GB/s; HGX H200 8-GPU.
    Device("H200 SXM 141GB", 4.8e12, 141 * _GiB, 67 * _T, 989 * _T, 989 * _T, 8, 450 * _GB,
           _NVLINK_LATENCY, "NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): HBM2e 2,039 GB/s; FP32 19.5 TFLOPS;
    # BF16/FP16 Tensor Core 312 TFLOPS dense (624 sparse); NVLink 600 GB/s (300 each way).
    Device("A100 SXM 80GB", 2.039e12, 80 * _GiB, 19.5 * _T, 312 * _T, 312 * _T, 8, 300 * _GB,
           _NVLINK_LATENCY, "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"),
    # NVIDIA L4 Tensor Core GPU datasheet: GDDR6 300 GB/s, 24 GB; FP32 30.3 TFLOPS; BF16/FP16
    # Tensor Core 242 TFLOPS with sparsity = 121 dense; PCIe Gen4 x16 64 GB/s (32 each way).
    Device("L4", 300 * _GB, 24 * _GiB, 30.3 * _T, 121 * _T, 121 * _T, 8, 32 * _GB,
           _PCIE_LATENCY, "NVIDIA L4 Tensor Core GPU datasheet"),
    # NVIDIA T4 Tensor Core GPU datasheet: GDDR6 320+ GB/s, 16 GB; FP32 8.1 TFLOPS; mixed
    # precision FP16/FP32 65 TFLOPS; no bfloat16 (Turing); PCIe Gen3 x16 32 GB/s (16 each way).
    Device("T4", 320 * _GB, 16 * _GiB, 8.1 * _T, None, 65 * _T, 8, 16 * _GB, _PCIE_LATENCY,
           "NVIDIA T4 Tensor Core GPU datasheet"),
    # NVIDIA Ada Lovelace GPU architecture whitepaper (GeForce RTX 4090): GDDR6X 1,008 GB/s,
    # 24 GB; FP32 82.6 TFLOPS; FP16/BF16 Tensor with FP32 accumulate 165.2 TFLOPS dense; no
    # NVLink, PCIe Gen4 x16 (32 GB/s each way).
    Device("RTX 4090", 1008 * _GB, 24 * _GiB, 82.6 * _T, 165.2 * _T, 165.2 * _T, 8, 32 * _GB,
           _PCIE_LATENCY, "NVIDIA Ada Lovelace GPU architecture whitepaper (RTX 4090)"),
    # Apple M2 (Apple newsroom and WWDC 2022 keynote): LPDDR5 unified memory 100 GB/s, up to
    # 24 GB; 10-core GPU 3.6 TFLOPS (FP32; FP16 runs at the same rate). One device.
    Device("Apple M2 (10-core GPU)", 100 * _GB, 24 * _GiB, 3.6 * _T, None, 3.6 * _T, 1,
           source="Apple newsroom, 'Apple unveils M2' (June 2022)"),
)}


def device(name: str) -> Device:
    """The table's device ``name`` (unknown names list the known ones)."""
    if name in DEVICES:
        return DEVICES[name]
    raise WorkbenchError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")


def match_device(name: str) -> Device | None:
    """The table entry for a device as torch names it (``"NVIDIA H100 80GB HBM3"`` -> H100 SXM),
    or None when the table has no such device (a PCIe or NVL H100, a 40 GB A100, an L40S...)."""
    text = name.upper().replace("-", " ")
    if re.search(r"\b(PCIE|NVL)\b", text):
        return None
    patterns = ((r"\bH100\b", "H100 SXM 80GB"), (r"\bH200\b", "H200 SXM 141GB"),
                (r"\bA100\b.*\b80GB\b", "A100 SXM 80GB"), (r"\bRTX 4090\b", "RTX 4090"),
                (r"\bL4\b", "L4"), (r"\bT4\b", "T4"))
    for pattern, entry in patterns:
        if re.search(pattern, text):
            return DEVICES[entry]
    return None


def this_machine(roofline: Roofline, memory_bytes: int, compute: str) -> Device:
    """This machine's record from numbers measured here: the :class:`Roofline` of
    :func:`workbench.hardware.measure_roofline` (its matmul peak is for ``compute``) and the
    memory (GPU memory, or RAM on a CPU). One device: its interconnect is not measured."""
    if compute not in COMPUTE_DTYPES:
        raise WorkbenchError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {compute!r}")
    flops = {f"{d}_flops": (roofline.peak_flops if d == compute else None) for d in COMPUTE_DTYPES}
    return Device(f"this machine: {roofline.device_name}", roofline.bandwidth, int(memory_bytes),
                  **flops, source="measured: workbench.hardware.measure_roofline")


def measure_this_machine(device: str | torch.device = "auto", compute: str | None = None) -> Device:
    """Measure ``device`` here (copy bandwidth, and matmul speed in ``compute``: default bf16 on
    CUDA, fp32 elsewhere; :func:`workbench.hardware.measure_bandwidth` and
    :func:`~workbench.hardware.measure_matmul_peak`, the two halves of
    :func:`~workbench.hardware.measure_roofline`) and return its :func:`this_machine` record, with
    the GPU's memory (CUDA) or the RAM as its memory."""
    from workbench.hardware import detect, measure_bandwidth, measure_matmul_peak, resolve_device

    dev = resolve_device(device)
    compute = compute or ("bf16" if dev.type == "cuda" else "fp32")
    if compute not in COMPUTE_DTYPES:
        raise WorkbenchError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {compute!r}")
    hw = detect(dev)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[compute]
    roofline = Roofline(measure_bandwidth(dev), measure_matmul_peak(dev, dtype=dtype),
                        f"{hw.device_name} ({dev})")
    if dev.type == "cuda":
        memory = next(g.memory_bytes for g in hw.gpus if g.index == (dev.index or 0))
    else:
        memory = hw.total_ram_bytes or 0
    if not memory:
        raise WorkbenchError(f"cannot tell the memory size of {dev}")
    return this_machine(roofline, memory, compute)
