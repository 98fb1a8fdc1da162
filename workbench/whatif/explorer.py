"""The what-if explorer: pick a model shape, a device, a batch, a context, a precision and a TP
degree, and see the predicted latency, throughput and memory (notebook ``09_serving_capstone``).

Every number comes from :func:`workbench.whatif.predict.predict` (roofline floors from the
device table of :mod:`workbench.whatif.devices`); a setting that cannot run (does not fit the
memory, a TP degree the heads do not divide, a dtype the device lacks) shows its one-line reason.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.model.presets import PRESETS
from workbench.whatif.devices import DEVICES, Device
from workbench.whatif.predict import Prediction, Scenario, predict

__all__ = ["WhatIfExplorer", "whatif_explorer"]

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTEXTS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
WEIGHTS = ("fp32", "bf16", "fp16", "int8", "int4")
KV = ("same as compute", "fp32", "bf16", "fp16", "int8", "int4")


class WhatIfExplorer:
    """The explorer's controls, its text and figure areas, and :meth:`update` (what every change
    runs). Displaying the object displays :attr:`widget`; tests call :meth:`update` directly."""

    def __init__(self, models: Mapping[str, ModelConfig] | None = None,
                 devices: Mapping[str, Device] | None = None, model: str = "llama-3.1-8b",
                 device: str = "H100 SXM 80GB", plot: bool = True) -> None:
        import ipywidgets as w

        self.models = dict(models or PRESETS)
        self.devices = dict(devices or DEVICES)
        if model not in self.models or device not in self.devices:
            raise WorkbenchError(f"unknown model {model!r} or device {device!r}: models "
                                 f"{list(self.models)}, devices {list(self.devices)}")
        self.plot, self.prediction = plot, None
        style = {"description_width": "6em"}
        self.model = w.Dropdown(options=list(self.models), value=model, description="model",
                                style=style)
        self.device = w.Dropdown(options=list(self.devices), value=device, description="device",
                                 style=style)
        self.weights = w.ToggleButtons(options=WEIGHTS, value="bf16", description="weights",
                                       style=style)
        self.kv = w.Dropdown(options=KV, value=KV[0], description="KV cache", style=style)
        self.tp = w.ToggleButtons(options=[1, 2, 4, 8], value=1, description="TP", style=style)
        self.batch = w.SelectionSlider(options=BATCHES, value=16, description="batch",
                                       continuous_update=False, style=style)
        self.context = w.SelectionSlider(options=CONTEXTS, value=1024, description="prompt",
                                         continuous_update=False, style=style)
        self.output = w.SelectionSlider(options=CONTEXTS[:6], value=256, description="output",
                                        continuous_update=False, style=style)
        self.text = w.HTML()
        self.figure = w.Output()
        controls = [self.model, self.device, self.weights, self.kv, self.tp, self.batch,
                    self.context, self.output]
        for c in controls:
            c.observe(lambda _: self.update(), names="value")
        self.widget = w.VBox([w.HBox([w.VBox(controls[:4]), w.VBox(controls[4:])]), self.text,
                              self.figure])
        self.update()

    def scenario(self) -> Scenario:
        """The :class:`Scenario` the controls describe (WorkbenchError if it cannot exist)."""
        kv = None if self.kv.value == KV[0] else self.kv.value
        return Scenario(self.models[self.model.value], self.devices[self.device.value],
                        batch=self.batch.value, context=self.context.value,
                        output=self.output.value, weights=self.weights.value, kv=kv,
                        tp=self.tp.value, model_name=self.model.value)

    def update(self) -> Prediction | None:
        """Predict for the current controls and show the numbers (and the figure)."""
        try:
            p = predict(self.scenario(), strict=False)
        except WorkbenchError as err:
            self.prediction = None
            self.text.value = f"<b style='color:#b00'>cannot run:</b> {html.escape(str(err))}"
            self.figure.clear_output()
            return None
        self.prediction = p
        r, colour = p.row(), "#070" if p.memory.fits else "#b00"
        self.text.value = (
            f"<span style='color:{colour}'>{html.escape(p.memory.message)}</span><br>"
            f"TTFT <b>{r['ttft_ms']:,.1f} ms</b> ({r['prefill_bound']}-bound prefill) &nbsp; "
            f"TPOT <b>{r['tpot_ms']:,.2f} ms</b> ({r['decode_bound']}-bound decode, all-reduce "
            f"{100 * r['comm_share']:.0f}% of a step) &nbsp; decode <b>{r['decode_tok_s']:,.0f} "
            f"tok/s</b> &nbsp; whole run <b>{r['throughput_tok_s']:,.0f} tok/s</b> "
            f"(floors: real engines reach a fraction of them)")
        if self.plot:
            import matplotlib.pyplot as plt

            from workbench.whatif.figures import plot_prediction

            with self.figure:
                self.figure.clear_output(wait=True)
                plot_prediction(p)
                plt.tight_layout()
                plt.show()
        return p

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def whatif_explorer(models: Mapping[str, ModelConfig] | None = None,
                    devices: Mapping[str, Device] | None = None, **kwargs) -> WhatIfExplorer:
    """Build the explorer (``models``: name -> config, default the shape presets; ``devices``:
    name -> :class:`Device`, default the table); display the returned object in a notebook."""
    return WhatIfExplorer(models, devices, **kwargs)
