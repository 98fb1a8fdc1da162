"""Shape presets: random-weight models with the exact shapes of real checkpoints.

Speed depends on shapes, not on trained values, so a GPU benchmark of the Llama-3.1-8B *shape* needs
no download. ``--model preset:llama-3.1-8b`` (CLI) or :func:`random_model` builds one directly on the
target device. Shapes are copied from each model's published ``config.json``.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig, RopeScaling
from workbench.model.llama import LlamaModel, empty_model

_LLAMA3_SCALING = dict(low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, eos_token_ids=(0,)),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, qkv_bias=True, model_type="qwen2", eos_token_ids=(151643,)),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, **_LLAMA3_SCALING), tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, **_LLAMA3_SCALING), tie_word_embeddings=False,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
}


def preset_config(name: str) -> ModelConfig:
    """The config of preset ``name`` (case-insensitive); unknown names list the known ones."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise WorkbenchError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def random_model(config: ModelConfig | str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.02) -> LlamaModel:
    """A model of that shape with N(0, std) weights, allocated directly on ``device``."""
    config = preset_config(config) if isinstance(config, str) else config
    model = empty_model(config, device, dtype)
    fill_random(model, seed, std)
    return model.eval()


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """N(0, std) matrices, norms 1, biases 0, drawn on the model's device (timing-only weights)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)
