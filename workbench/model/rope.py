"""Rotary position embeddings (RoPE), with Llama 3.1's "llama3" frequency scaling.

Each pair of channels (i, i + d/2) of a query or key is rotated by the angle ``pos * inv_freq[i]``,
``inv_freq[i] = theta ** (-2i / d)``, so that the dot product of a query at position m with a key at
position n depends only on m - n. Positions are an explicit tensor, not ``arange(T)``: a left-padded
batch, a packed batch of several sequences, or a rolling cache (StreamingLLM, notebook 08) each choose
their own. Taught in notebook ``00_tour``.
"""

from __future__ import annotations

import math

import torch

from workbench.model.config import ModelConfig, RopeScaling


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """``inv_freq`` [d/2] in float32, scaled as Llama 3.1 does when ``rope_scaling`` is set."""
    d = config.head_dim
    # on the CPU even inside ``with torch.device("meta")`` (a meta division imports torch._dynamo: 2.4 s)
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d  # [d/2]
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Keep high frequencies, divide low ones by ``factor``, interpolate the band in between."""
    wavelen = 2 * math.pi / inv_freq
    long_wave = s.original_max_position_embeddings / s.low_freq_factor  # longer: scaled down fully
    short_wave = s.original_max_position_embeddings / s.high_freq_factor  # shorter: kept
    scaled = torch.where(wavelen > long_wave, inv_freq / s.factor, inv_freq)
    # weight of the unscaled frequency, 0 at long_wave .. 1 at short_wave
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= short_wave) & (wavelen <= long_wave)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``positions`` [B, T] -> each [B, T, d] (angles repeated for both halves)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, d/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, d] by the angles in cos/sin [B, T, d] (the "rotate half" layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]  # cos/sin: [B, 1, T, d] broadcast over heads
