"""What-if serving: predict latency, throughput and memory of a model shape on real devices from
the roofline and the library's own byte accounting, and compare with a measured run
(notebook ``09_serving_capstone``).

``devices``: the device table and this machine's measured record; ``footprint``: weight and KV
bytes per TP rank at a precision; ``predict``: :class:`Scenario` -> :class:`Prediction` (TTFT,
TPOT, tok/s, memory fit); ``compare``: a measured engine run against its floors, step by step;
``serve``: the combined serving runs of the capstone; ``explorer``: the widget; ``figures``.
"""

from workbench.whatif.devices import (DEVICES, Device, match_device, measure_this_machine,
                                      this_machine)
from workbench.whatif.footprint import Footprint, footprint
from workbench.whatif.predict import (MemoryFit, Prediction, Scenario, StepCost, check_fit,
                                      decode_step, memory_fit, predict, prefill_step, step_cost)

__all__ = ["DEVICES", "Device", "Footprint", "MemoryFit", "Prediction", "Scenario", "StepCost",
           "check_fit", "decode_step", "footprint", "match_device", "measure_this_machine",
           "memory_fit", "predict", "prefill_step", "step_cost", "this_machine"]
