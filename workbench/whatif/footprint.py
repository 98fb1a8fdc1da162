"""What a model shape occupies on one device: weight bytes and KV bytes per token, per TP rank.

Formats, as the library stores them:

* ``"fp32"``, ``"bf16"``, ``"fp16"``: every weight in that dtype (4, 2, 2 bytes a value);
* a quantization setting (``"int8"``: per output channel, ``"int4"``: groups of 64, or any
  :func:`~workbench.quant.groupwise.parse_quant_config` name such as ``"int4-g128-asym"``): the
  decoder layers' linear matrices as packed codes plus float16 scales (and offsets when asymmetric),
  exactly as :func:`~workbench.quant.linear.quantize_model` stores them; norms, biases, and the
  embedding table and LM head (unless ``quantize_embeddings``) stay in the activation dtype.

KV cache per token: ``2 (K, V) x layers x Hkv x head_dim`` values, in the activation dtype or as
:class:`~workbench.quant.kv.QuantizedKVCache` stores them (``"int8"``: one float16 scale per vector,
``"int4"``: FlexGen's groups of 32 with a float16 scale and offset).

Tensor parallelism: one rank holds :func:`~workbench.parallel.plan.shard_config`'s shape, ``1/tp``
of the heads and MLP width; the embedding table, LM head and norms are whole on every rank (as
:mod:`workbench.parallel` builds ranks without vocabulary parallelism). Taught in notebook
``09_serving_capstone``; the tests check every count against the library's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.kv.paged import kv_bytes_per_token
from workbench.model.config import ModelConfig
from workbench.offload.layout import weight_units
from workbench.parallel.plan import shard_config
from workbench.quant.groupwise import QuantConfig, parse_quant_config
from workbench.quant.kv import KV_INT4, KV_INT8

__all__ = ["DTYPES", "Footprint", "footprint", "kv_format", "weight_format"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_format(name: str) -> torch.dtype | QuantConfig:
    """``"fp32" | "bf16" | "fp16"`` -> a dtype; a quantization name -> its :class:`QuantConfig`."""
    if name in DTYPES:
        return DTYPES[name]
    try:
        return parse_quant_config(name)
    except WorkbenchError:
        raise WorkbenchError(f"unknown weight format {name!r}: expected {', '.join(DTYPES)}, int8, "
                             "int4 or int<4|8>-<gN|ch>-<sym|asym>") from None


def kv_format(name: str) -> torch.dtype | QuantConfig:
    """``"fp32" | "bf16" | "fp16"`` -> a dtype; ``"int8"``/``"int4"`` -> the formats of
    :class:`~workbench.quant.kv.QuantizedKVCache` (or any quantization name)."""
    if name in DTYPES:
        return DTYPES[name]
    if name in ("int8", "int4"):
        return KV_INT8 if name == "int8" else KV_INT4
    try:
        return parse_quant_config(name)
    except WorkbenchError:
        raise WorkbenchError(f"unknown KV format {name!r}: expected {', '.join(DTYPES)}, int8, "
                             "int4 or int<4|8>-<gN|ch>-<sym|asym>") from None


@dataclass(frozen=True)
class Footprint:
    """Bytes one rank holds: ``weights`` in all (of which ``linear``: the decoder layers' linear
    matrices; ``embedding``: an *untied* input table, read one row per token, not streamed), and
    ``kv_per_token``: the KV cache of one token over all layers."""

    weights: int
    linear: int
    embedding: int
    kv_per_token: int

    def step_weight_bytes(self, tokens: int, vocab_size: int) -> float:
        """Weight bytes one forward pass over ``tokens`` tokens reads: every weight once, except
        an untied embedding table, of which only the looked-up rows are read."""
        rows = min(tokens, vocab_size) / vocab_size
        return self.weights - self.embedding + self.embedding * rows


def _nbytes(shape: tuple[int, ...], fmt: torch.dtype | QuantConfig) -> int:
    if isinstance(fmt, QuantConfig):
        return fmt.nbytes(shape)
    return math.prod(shape) * torch.empty((), dtype=fmt).element_size()


def footprint(config: ModelConfig, weights: str, compute: str, kv: str | None = None,
              tp: int = 1, quantize_embeddings: bool = False) -> Footprint:
    """One TP rank's :class:`Footprint` of ``config`` with ``weights`` stored as that format,
    activations (and every unquantized tensor) in ``compute``, the KV cache as ``kv``
    (None: ``compute``). See the module docstring."""
    if compute not in DTYPES:
        raise WorkbenchError(f"compute dtype must be one of {', '.join(DTYPES)}, got {compute!r}")
    wfmt, act = weight_format(weights), DTYPES[compute]
    kfmt = kv_format(kv or compute)
    if not isinstance(wfmt, QuantConfig) and wfmt != act:
        raise WorkbenchError(f"{weights} weights compute in {weights}: a dense model has one "
                             f"dtype, got compute={compute!r}")
    if quantize_embeddings and not isinstance(wfmt, QuantConfig):
        raise WorkbenchError("quantize_embeddings needs quantized weights (int8, int4, ...)")
    shard = shard_config(config, tp)
    table_fmt = wfmt if quantize_embeddings else act
    total = linear = embedding = 0
    for unit in weight_units(shard):
        for p in unit.params:
            if unit.kind == "layer" and len(p.shape) == 2:  # q/k/v/o and the MLP matrices
                nbytes = _nbytes(p.shape, wfmt)
                linear += nbytes
            elif p.name in ("embed_tokens.weight", "lm_head.weight"):  # tied: lm_head only
                nbytes = _nbytes(p.shape, table_fmt)
                if p.name == "embed_tokens.weight":
                    embedding = nbytes
            else:  # norms and biases stay in the activation dtype
                nbytes = _nbytes(p.shape, act)
            total += nbytes
    if isinstance(kfmt, QuantConfig):
        per_vector = kfmt.nbytes((1, shard.head_dim))
        kv_token = 2 * shard.num_hidden_layers * shard.num_key_value_heads * per_vector
    else:
        kv_token = kv_bytes_per_token(shard, kfmt)
    return Footprint(total, linear, embedding, kv_token)
