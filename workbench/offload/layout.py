"""The model as a sequence of weight *units* that stream through fast memory one at a time.

FlexGen treats a model as a list of layers: the input embedding, the decoder layers, the output
embedding. Each unit's weights are loaded (or found resident) before it runs and may be dropped
after. Here a unit is a list of named parameters of :class:`~workbench.model.llama.LlamaModel`:

    embed     embed_tokens.weight                     (empty when tied: the head holds the matrix)
    layer i   layers.i.{input_layernorm, self_attn.*, post_attention_layernorm, mlp.*}
    head      norm.weight, lm_head.weight

Taught in notebook ``06_offloading``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from workbench.model.config import ModelConfig
from workbench.model.llama import LlamaModel


@dataclass(frozen=True)
class Param:
    """One weight tensor: its HF-style name (without ``model.``) and shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Unit:
    """A unit of the stream: ``kind`` is "embed", "layer" or "head"; ``index`` the layer number."""

    name: str
    kind: str
    index: int
    params: tuple[Param, ...]

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(p.numel for p in self.params) * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@lru_cache(maxsize=16)
def weight_units(config: ModelConfig) -> tuple[Unit, ...]:
    """The units of a model in execution order: embed, layers 0..L-1, head (cached: configs are
    frozen)."""
    with torch.device("meta"):  # one layer is enough: every layer has the same tensors
        model = LlamaModel(replace(config, num_hidden_layers=min(1, config.num_hidden_layers)))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if config.tie_word_embeddings:  # named_parameters lists the tied matrix once, as the embedding
        shapes["lm_head.weight"] = shapes.pop("embed_tokens.weight")
    units = [Unit("embed", "embed", -1, tuple(Param(n, s) for n, s in shapes.items()
                                                if n.startswith("embed_tokens.")))]
    layer = [(n.removeprefix("layers.0."), s) for n, s in shapes.items() if n.startswith("layers.0.")]
    for i in range(config.num_hidden_layers):
        units.append(Unit(f"layer {i}", "layer", i,
                          tuple(Param(f"layers.{i}.{n}", s) for n, s in layer)))
    units.append(Unit("head", "head", config.num_hidden_layers,
                      tuple(Param(n, shapes[n]) for n in ("norm.weight", "lm_head.weight"))))
    return tuple(units)


def model_weight_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of all weights (the tied matrix once)."""
    return config.num_parameters() * _itemsize(dtype)
