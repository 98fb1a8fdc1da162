"""Shape presets carry the real models' parameter counts; random models of them run."""

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.model import ForwardBatch, load_model, load_tokenizer
from workbench.model.presets import PRESETS, preset_config, random_model

# Published parameter counts (embedding + layers + head, tied heads counted once)
KNOWN = {"smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768,
         "llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts(name):
    assert preset_config(name).num_parameters() == KNOWN[name]


def test_random_model_has_the_shape_and_runs():
    model = random_model("smollm2-135m", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == KNOWN["smollm2-135m"]
    assert model.lm_head.weight is model.embed_tokens.weight
    logits = model(ForwardBatch.prefill(torch.tensor([[1, 2, 3]])))
    assert logits.shape == (1, 3, 49152) and torch.isfinite(logits).all()


def test_preset_through_load_model_and_errors():
    assert load_model("preset:SmolLM2-135M").config == PRESETS["smollm2-135m"]
    assert load_tokenizer("preset:smollm2-135m") is None
    with pytest.raises(WorkbenchError, match="known: smollm2-135m"):
        preset_config("gpt-5")
