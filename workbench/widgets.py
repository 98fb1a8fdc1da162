"""Interactive widgets for the notebooks (ipywidgets; imported only when a notebook asks).

:func:`generation_playground` puts the sampling knobs of :class:`~workbench.engine.SamplingParams`
on sliders: temperature 0 is greedy (the same tokens every time); a higher temperature flattens the
distribution, ``top_k`` keeps the k likeliest tokens and ``top_p`` the smallest set holding that
much probability; the seed fixes the random stream, so a setting re-run gives the same text. Each
click runs :func:`~workbench.engine.generate_static` on one prompt. Used by notebook ``00_tour``.
"""

from __future__ import annotations

import html
from typing import Any

from workbench.engine import SamplingParams, generate_static
from workbench.engine.requests import RequestTrace
from workbench.errors import WorkbenchError
from workbench.model.llama import LlamaModel

__all__ = ["Playground", "generation_playground"]


class Playground:
    """The playground's controls, its output area, and :meth:`generate` (what the button runs).

    Displaying the object displays :attr:`widget`; tests call :meth:`generate` directly.
    """

    def __init__(self, model: LlamaModel, tokenizer: Any, prompt: str = "def fibonacci(n):",
                 max_new_tokens: int = 64) -> None:
        import ipywidgets as w

        self.model, self.tokenizer = model, tokenizer
        wide = {"style": {"description_width": "8em"}, "layout": w.Layout(width="28em")}
        self.prompt = w.Textarea(value=prompt, description="prompt", style=wide["style"],
                                 layout=w.Layout(width="95%", height="7em"))
        self.max_new_tokens = w.IntSlider(max_new_tokens, min=1, max=512,
                                          description="max_new_tokens", **wide)
        self.temperature = w.FloatSlider(0.0, min=0.0, max=2.0, step=0.05,
                                         description="temperature", **wide)
        self.top_k = w.IntSlider(0, min=0, max=200, description="top_k (0 = off)", **wide)
        self.top_p = w.FloatSlider(1.0, min=0.05, max=1.0, step=0.05, description="top_p", **wide)
        self.seed = w.IntSlider(0, min=0, max=1000, description="seed", **wide)
        self.button = w.Button(description="Generate", button_style="primary", icon="play")
        self.output = w.HTML()  # the prompt, then the completion in bold
        self.status = w.HTML()  # token count, finish reason, tokens/s
        self.button.on_click(lambda _: self.generate())
        knobs = w.HBox([w.VBox([self.max_new_tokens, self.temperature, self.seed]),
                        w.VBox([self.top_k, self.top_p, self.button])])
        self.widget = w.VBox([self.prompt, knobs, self.status, self.output])

    def sampling(self) -> SamplingParams:
        """The :class:`SamplingParams` the sliders describe."""
        return SamplingParams(temperature=self.temperature.value, top_k=self.top_k.value,
                              top_p=self.top_p.value, seed=self.seed.value)

    def generate(self) -> RequestTrace | None:
        """Generate for the prompt with the current settings, show it, and return the output."""
        prompt = self.prompt.value
        try:
            if not prompt:
                raise WorkbenchError("the prompt is empty")
            ids = list(self.tokenizer.encode(prompt))
            self.button.disabled = True
            run = generate_static(self.model, [ids], self.max_new_tokens.value, batch_size=1,
                                  sampling=self.sampling())
        except WorkbenchError as err:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return None
        finally:
            self.button.disabled = False
        out = run.outputs[0]
        text = self.tokenizer.decode(out.output_ids, skip_special_tokens=True)
        self.output.value = (f"<pre style='white-space:pre-wrap'>{html.escape(prompt)}"
                             f"<b>{html.escape(text)}</b></pre>")
        hint = (" (the prompt ends with a newline: this tokenizer merges newlines with the "
                "indentation after them, so the model often stops at once)"
                if prompt.endswith("\n") else "")
        self.status.value = (
            f"{len(ids)} prompt tokens, <b>{len(out.output_ids)}</b> generated, finish reason "
            f"<b>{out.finish_reason}</b>, {len(out.output_ids) / max(run.seconds, 1e-9):.1f} "
            f"tokens/s (prefill included, {run.seconds * 1e3:.0f} ms){hint}")
        return out

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def generation_playground(model: LlamaModel, tokenizer: Any, prompt: str = "def fibonacci(n):",
                          max_new_tokens: int = 64) -> Playground:
    """An ipywidgets UI: prompt, max_new_tokens, temperature, top_k, top_p and seed, a Generate
    button, and the completion with its token count, finish reason and tokens/s."""
    return Playground(model, tokenizer, prompt, max_new_tokens)
