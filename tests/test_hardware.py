"""Tests for workbench.hardware, workbench.roofline and workbench.viz.roofline (fast, no speed asserts)."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.hardware import (
    HardwareInfo,
    Roofline,
    detect,
    measure_bandwidth,
    measure_matmul_peak,
    measure_roofline,
    resolve_device,
)

# --------------------------------------------------------------------------- resolve_device


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu "])
def test_resolve_cpu(name: str) -> None:
    assert resolve_device(name) == torch.device("cpu")


def test_resolve_auto() -> None:
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", ["gpu0", "tpu", "", "cuda:x", "cuda:-1", "cpu0"])
def test_resolve_bad_names(name: str) -> None:
    with pytest.raises(WorkbenchError) as err:
        resolve_device(name)
    message = str(err.value)
    assert "available" in message and "cpu" in message and "auto" in message
    assert "\n" not in message


def test_resolve_cuda_without_cuda() -> None:
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        with pytest.raises(WorkbenchError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
        return
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(WorkbenchError, match="CUDA is not available"):
            resolve_device(name)


def test_resolve_mps_when_missing() -> None:
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        assert resolve_device("mps").type == "mps"
    else:
        with pytest.raises(WorkbenchError, match="mps"):
            resolve_device("mps")


# --------------------------------------------------------------------------- detect


def test_detect_fields() -> None:
    info = detect("cpu")
    assert isinstance(info, HardwareInfo)
    assert info.device == "cpu"
    assert info.cpu_name and isinstance(info.cpu_name, str)
    assert info.logical_cores >= 1 and info.torch_threads >= 1
    assert info.total_ram_bytes is None or info.total_ram_bytes > 1 << 20
    assert info.torch_version == torch.__version__
    assert info.python_version.startswith("3.")
    assert len(info.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    with pytest.raises(AttributeError):  # frozen
        info.device = "cuda"  # type: ignore[misc]


def test_detect_stamp_and_dict_are_json() -> None:
    info = detect("cpu")
    stamp = info.stamp()
    assert stamp["device"] == info.cpu_name
    assert stamp["num_devices"] == 1
    assert stamp["device_type"] == "cpu"
    data = info.to_dict()
    assert data["device"] == "cpu" and isinstance(data["gpus"], list)
    json.dumps(stamp)
    json.dumps(data)


def test_detect_rejects_bad_device() -> None:
    with pytest.raises(WorkbenchError):
        detect("tpu")


# --------------------------------------------------------------------------- measurements


def test_measure_bandwidth_tiny() -> None:
    bw = measure_bandwidth("cpu", nbytes=1 << 20, repeats=2)
    assert bw > 0 and math.isfinite(bw)
    assert measure_bandwidth(torch.device("cpu"), quick=True) > 0


def test_measure_matmul_peak_tiny() -> None:
    flops = measure_matmul_peak("cpu", n=64, repeats=2)
    assert flops > 0 and math.isfinite(flops)
    assert measure_matmul_peak("cpu", dtype=torch.float64, n=32, repeats=1) > 0


def test_measure_bad_sizes() -> None:
    with pytest.raises(WorkbenchError):
        measure_bandwidth("cpu", nbytes=0)
    with pytest.raises(WorkbenchError):
        measure_matmul_peak("cpu", n=0)
    with pytest.raises(WorkbenchError):
        measure_matmul_peak("cpu", n=8, repeats=0)


def test_measure_roofline_quick() -> None:
    roof = measure_roofline("cpu", quick=True)
    assert roof.bandwidth > 0 and roof.peak_flops > 0
    assert "cpu" in roof.device_name
    assert math.isfinite(roof.ridge_point)


# --------------------------------------------------------------------------- roofline maths

# 100 GB/s and 1 TFLOP/s: ridge at 10 FLOP/byte.
ROOF = Roofline(bandwidth=100e9, peak_flops=1e12, device_name="toy")


def test_ridge_point() -> None:
    assert ROOF.ridge_point == pytest.approx(10.0)


def test_attainable_both_sides() -> None:
    assert ROOF.attainable(1.0) == pytest.approx(100e9)  # memory-bound: 1 * 100 GB/s
    assert ROOF.attainable(2.5) == pytest.approx(250e9)
    assert ROOF.attainable(10.0) == pytest.approx(1e12)  # at the ridge both limits agree
    assert ROOF.attainable(1000.0) == pytest.approx(1e12)  # compute-bound: flat roof
    assert ROOF.attainable(0.0) == 0.0
    assert ROOF.is_memory_bound(1.0) and not ROOF.is_memory_bound(100.0)


def test_time_floor() -> None:
    # 1 GFLOP over 1 GB: memory needs 10 ms, compute 1 ms -> 10 ms.
    assert ROOF.time_floor(1e9, 1e9) == pytest.approx(0.01)
    # 1 TFLOP over 1 GB: compute needs 1 s, memory 10 ms -> 1 s.
    assert ROOF.time_floor(1e12, 1e9) == pytest.approx(1.0)
    assert ROOF.time_floor(0, 0) == 0.0


def test_decode_floor() -> None:
    # A 2 GB model (1B params in bf16) at 100 GB/s: >= 20 ms a step, <= 50 tokens/s at batch 1.
    assert ROOF.decode_step_floor(2e9) == pytest.approx(0.02)
    assert ROOF.decode_step_floor(2e9, kv_bytes=0.5e9) == pytest.approx(0.025)
    assert ROOF.max_decode_tokens_per_s(2e9) == pytest.approx(50.0)
    assert ROOF.max_decode_tokens_per_s(2e9, batch=8) == pytest.approx(400.0)
    assert ROOF.max_decode_tokens_per_s(2e9, batch=8, kv_bytes=0.5e9) == pytest.approx(320.0)


def test_roofline_validation() -> None:
    with pytest.raises(WorkbenchError):
        Roofline(bandwidth=0, peak_flops=1e12)
    with pytest.raises(WorkbenchError):
        Roofline(bandwidth=1e9, peak_flops=-1.0)
    with pytest.raises(WorkbenchError):
        ROOF.attainable(-1.0)
    with pytest.raises(WorkbenchError):
        ROOF.max_decode_tokens_per_s(1e9, batch=0)
    with pytest.raises(AttributeError):  # frozen
        ROOF.bandwidth = 1.0  # type: ignore[misc]
    assert "toy" in str(ROOF) and "GB/s" in str(ROOF)


# --------------------------------------------------------------------------- plot


def test_plot_roofline() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    from workbench.viz.roofline import plot_roofline

    points = [("decode batch 1", 1.0, 5e10), ("prefill", 200.0, 8e11), ("bad", 0.0, 1.0)]
    ax = plot_roofline(ROOF, points=points)
    try:
        assert isinstance(ax, Axes)
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        texts = [t.get_text() for t in ax.texts]
        assert "decode batch 1" in texts and "prefill" in texts and "bad" not in texts
        assert any("ridge" in t for t in texts)
        lo, hi = ax.get_xlim()
        assert lo < 1.0 and hi > 200.0
    finally:
        plt.close(ax.figure)

    fig, given = plt.subplots()
    try:
        assert plot_roofline(ROOF, ax=given) is given
    finally:
        plt.close(fig)
