"""Tests for workbench.anatomy, workbench.viz.anatomy and workbench.widgets (tiny random models)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from workbench import anatomy
from workbench.engine import SamplingParams, generate_static
from workbench.errors import WorkbenchError
from workbench.model import LlamaModel, ModelConfig
from workbench.roofline import Roofline


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(tied: bool = True, bias: bool = False) -> LlamaModel:
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128, tie_word_embeddings=tied, qkv_bias=bias,
                         eos_token_ids=(0,), pad_token_id=0)
    torch.manual_seed(0)
    return LlamaModel(config).eval()


class ByteTokenizer:
    """Stands in for a Hugging Face tokenizer: one id per byte (ids 1..256), 0 is EOS."""

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - 1 for i in ids if 0 < i <= 256).decode(errors="replace")


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_parameter_table_totals(tied: bool, bias: bool) -> None:
    model = tiny_model(tied, bias)
    rows = anatomy.parameter_table(model)
    total = rows[-1]
    assert total["component"] == "total"
    assert total["parameters"] == sum(p.numel() for p in model.parameters())  # tied once
    assert total["parameters"] == model.config.num_parameters()
    assert sum(r["parameters"] for r in rows[:-1]) == total["parameters"]
    assert total["bytes"] == 4 * total["parameters"]
    head = next(r for r in rows if r["component"] == "LM head")
    assert (head["parameters"] == 0) == tied
    assert ("tied" in head["note"]) == tied
    q = next(r for r in rows if r["component"] == "attention q_proj")
    assert q["tensors"] == 2 and q["parameters"] == 2 * (64 * 64 + 64 * bias)
    kinds = anatomy.shares_by_kind(rows)
    assert set(kinds) == {"embedding", "norms", "attention", "MLP", "LM head"}
    assert sum(kinds.values()) == pytest.approx(1.0) and kinds["MLP"] > kinds["attention"]
    text = anatomy.rows_text(rows, ["component", "shape", "parameters", "MiB", "share", "note"])
    assert "total" in text and "100.0%" in text


def test_forward_cost_decode_vs_prefill() -> None:
    config = tiny_model().config
    decode = anatomy.forward_cost(config, 1, 1, context_len=32)
    prefill = anatomy.forward_cost(config, 1, 64)
    assert decode["weight_bytes"] == 4 * config.num_parameters()
    assert decode["kv_bytes"] == 33 * config.kv_bytes_per_token(4)
    assert decode["intensity"] < 1 < 10 < prefill["intensity"]  # ~2 FLOP per 4-byte weight
    untied = anatomy.forward_cost(tiny_model(tied=False).config, 1, 1)
    assert untied["weight_bytes"] == 4 * (config.num_parameters() + 64)  # head + one embedding row


@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_profile_rows(device: str) -> None:
    model = tiny_model().to(device)
    roofline = Roofline(bandwidth=10e9, peak_flops=100e9)
    rows = anatomy.decode_step_profile(model, batch_size=2, context_len=16, repeats=2, warmup=1,
                                       roofline=roofline)
    parts = [r for r in rows if r["kind"] == "component"]
    assert [r["component"] for r in parts] == list(anatomy.COMPONENTS)
    assert all(r["seconds"] > 0 for r in parts)
    assert sum(r["share"] for r in parts) == pytest.approx(1.0)
    total = next(r for r in rows if r["kind"] == "total")
    floor = next(r for r in rows if r["kind"] == "floor")
    assert total["seconds"] > 0 and total["ms"] == pytest.approx(1e3 * total["seconds"])
    cost = anatomy.forward_cost(model.config, 2, 1, 16)
    assert floor["seconds"] == pytest.approx(cost["bytes"] / 10e9)
    with pytest.raises(WorkbenchError):
        anatomy.decode_step_profile(model, repeats=0)


def test_measure_forward_point() -> None:
    point = anatomy.measure_forward(tiny_model(), batch_size=1, new_tokens=8, context_len=4,
                                    repeats=1)
    assert point["seconds"] > 0 and point["flops_per_s"] > 0
    assert point["intensity"] == pytest.approx(point["flops"] / point["bytes"])


def test_plots_return_axes_and_figure() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from workbench.viz.anatomy import plot_decode_profile, plot_parameter_table

    model = tiny_model()
    ax = plot_parameter_table(anatomy.parameter_table(model))
    assert isinstance(ax, Axes)
    rows = anatomy.decode_step_profile(model, context_len=4, repeats=1, warmup=0,
                                       roofline=Roofline(1e9, 1e10))
    fig = plot_decode_profile(rows)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    plt.close("all")


def test_playground_matches_generate_static() -> None:
    pytest.importorskip("ipywidgets")
    from workbench.widgets import generation_playground

    model, tok = tiny_model(), ByteTokenizer()
    play = generation_playground(model, tok, prompt="def f(x):", max_new_tokens=12)
    out = play.generate()
    expected = generate_static(model, [tok.encode("def f(x):")], 12).outputs[0]
    assert out is not None and out.output_ids == expected.output_ids
    assert out.finish_reason == expected.finish_reason
    assert f"<b>{len(out.output_ids)}</b> generated" in play.status.value
    play.temperature.value, play.top_k.value, play.seed.value = 0.8, 20, 3
    sampled = play.generate()
    again = generate_static(model, [tok.encode("def f(x):")], 12,
                            sampling=SamplingParams(temperature=0.8, top_k=20, seed=3)).outputs[0]
    assert sampled is not None and sampled.output_ids == again.output_ids
    play.prompt.value = ""
    assert play.generate() is None and "empty" in play.status.value
