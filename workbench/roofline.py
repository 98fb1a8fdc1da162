"""The roofline model: what the hardware allows, before any code is written.

A kernel does ``flops`` arithmetic and moves ``nbytes`` between memory and the chip. Its
*arithmetic intensity* is ``I = flops / nbytes`` (FLOP/byte). The machine can do at most
``peak_flops`` FLOP/s and move at most ``bandwidth`` bytes/s, so the attainable speed is::

    attainable(I) = min(peak_flops, I * bandwidth)

Plotted log-log this is a slanted line (memory-bound) meeting a flat roof (compute-bound) at the
*ridge point* ``I* = peak_flops / bandwidth``. Kernels left of the ridge wait on memory; kernels
right of it wait on arithmetic.

For LLM inference the punchline is that *decode is memory-bound*: every generated token needs a
matrix-vector product with every weight, so each decode step must stream every weight byte (and
the KV cache) once while doing only ~2 FLOP per weight, an intensity of ~1 FLOP/byte at batch 1 --
far left of the ridge. Hence ``step time >= bytes / bandwidth`` and the cheapest way to more
tokens/s is a bigger batch, which reuses each weight byte for ``batch`` tokens. Prefill, a
matrix-matrix product over the whole prompt, sits far to the right and is compute-bound.

Notebook ``00_tour`` teaches this with numbers measured on your own machine
(:func:`workbench.hardware.measure_roofline`) and the plot from
:func:`workbench.viz.roofline.plot_roofline`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workbench.errors import WorkbenchError

__all__ = ["Roofline"]


def _check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise WorkbenchError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Roofline:
    """A two-number model of a device: memory ``bandwidth`` (bytes/s) and ``peak_flops`` (FLOP/s).

    All times are lower bounds ("floors"): real kernels are slower, and the gap to the floor is
    what optimisation can win. See the module docstring and notebook ``00_tour``.
    """

    bandwidth: float
    peak_flops: float
    device_name: str = "unknown device"

    def __post_init__(self) -> None:
        for name in ("bandwidth", "peak_flops"):
            value = getattr(self, name)
            _check_nonnegative(name, value)
            if value == 0:
                raise WorkbenchError(f"Roofline {name} must be > 0, got {value!r}")

    @property
    def ridge_point(self) -> float:
        """Intensity (FLOP/byte) where the memory slope meets the compute roof: ``peak / bandwidth``.

        Below it a kernel is memory-bound, above it compute-bound.
        """
        return self.peak_flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        """Best possible FLOP/s at arithmetic ``intensity`` (FLOP/byte): ``min(peak, I * bandwidth)``."""
        _check_nonnegative("intensity", intensity)
        return min(self.peak_flops, intensity * self.bandwidth)

    def is_memory_bound(self, intensity: float) -> bool:
        """True when ``intensity`` lies left of the ridge point (memory is the bottleneck)."""
        _check_nonnegative("intensity", intensity)
        return intensity < self.ridge_point

    def time_floor(self, flops: float, nbytes: float) -> float:
        """Least seconds for work of ``flops`` FLOP moving ``nbytes`` bytes.

        ``max(flops / peak_flops, nbytes / bandwidth)``: compute and memory traffic can overlap,
        so the slower of the two sets the floor.
        """
        _check_nonnegative("flops", flops)
        _check_nonnegative("nbytes", nbytes)
        return max(flops / self.peak_flops, nbytes / self.bandwidth)

    def decode_step_floor(self, weight_bytes: float, kv_bytes: float = 0) -> float:
        """Least seconds for one decode step: ``(weight_bytes + kv_bytes) / bandwidth``.

        Decode is memory-bound: each step must stream every weight byte once (and read the whole
        KV cache, ``kv_bytes`` summed over the batch), while its arithmetic is tiny, so
        ``time >= bytes / bandwidth``. The step costs about the same for batch 1 or batch 32.
        """
        _check_nonnegative("weight_bytes", weight_bytes)
        _check_nonnegative("kv_bytes", kv_bytes)
        return (weight_bytes + kv_bytes) / self.bandwidth

    def max_decode_tokens_per_s(
        self, weight_bytes: float, batch: int = 1, kv_bytes: float = 0
    ) -> float:
        """Ceiling on decode throughput: ``batch / decode_step_floor(weight_bytes, kv_bytes)``.

        A step yields one token per sequence in the batch, and the weight bytes are read once for
        all of them, which is why batching raises tokens/s almost for free until the KV cache
        (``kv_bytes``, total over the batch) or compute starts to dominate.
        """
        if not isinstance(batch, int) or batch < 1:
            raise WorkbenchError(f"batch must be an integer >= 1, got {batch!r}")
        floor = self.decode_step_floor(weight_bytes, kv_bytes)
        return math.inf if floor == 0 else batch / floor

    def __str__(self) -> str:
        return (
            f"Roofline({self.device_name}: {self.bandwidth / 1e9:.1f} GB/s, "
            f"{self.peak_flops / 1e9:.1f} GFLOP/s, ridge {self.ridge_point:.1f} FLOP/byte)"
        )
