"""Weight-only quantization of a model: linear layers (and optionally embeddings) keep packed codes.

    y = x W_hat^T + b,   W_hat = dequantize(codes, scales, offsets)   (groups along in-features)

:class:`QuantLinear` stores its weight as a :class:`~workbench.quant.groupwise.QuantizedTensor`
(int8 or 4-bit codes plus per-group scales) and dequantizes it to the activations' dtype on every
call: memory shrinks 2-4x against bf16, arithmetic is unchanged. On a GPU, decoding one token reads
every weight once, so reading fewer bytes can make it faster, but only when the dequantization is
fused into the matmul (:mod:`workbench.quant.kernels`); the eager version here reads the codes and
then writes and reads a full-precision copy. Activations are never quantized.

:func:`quantize_model` swaps a :class:`~workbench.model.llama.LlamaModel`'s ``nn.Linear`` layers in
place. The embedding table and the LM head (the same matrix when tied) stay full precision unless
``embeddings=True``; a tied pair then shares one quantized tensor. Quantize after moving the model
to its device and dtype (``model.to(dtype)`` would also cast the float16 scales). Taught in notebook
``07_quantization``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.quant.groupwise import QuantConfig, QuantizedTensor, quantize


class _QuantizedWeight(nn.Module):
    """Buffers of a quantized matrix (so ``.to(device)`` moves them); shared by a tied pair."""

    def __init__(self, q: QuantizedTensor) -> None:
        super().__init__()
        self.register_buffer("data", q.data)
        self.register_buffer("scale", q.scale)
        self.register_buffer("zero", q.zero)
        self.shape, self.config = q.shape, q.config

    def tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.data, self.scale, self.zero, self.shape, self.config)


class QuantLinear(nn.Module):
    """A linear layer whose weight [out, in] is stored quantized, groups along ``in``."""

    def __init__(self, weight: QuantizedTensor | _QuantizedWeight,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = weight if isinstance(weight, _QuantizedWeight) else _QuantizedWeight(weight)
        self.out_features, self.in_features = self.qweight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.kernel = None  # a fused matmul installed by workbench.quant.kernels, else dequantize

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        return cls(quantize(linear.weight, config), linear.bias)

    @property
    def config(self) -> QuantConfig:
        return self.qweight.config

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight W_hat [out, in]."""
        return self.qweight.tensor().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            y = self.kernel(x.reshape(-1, self.in_features))  # [N, out]
            y = y.reshape(*x.shape[:-1], self.out_features)  # [..., out]
            return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight(x.dtype), bias)

    def extra_repr(self) -> str:
        kernel = "" if self.kernel is None else f", kernel={self.kernel.name}"
        return f"{self.in_features} -> {self.out_features}, {self.config.name}{kernel}"


class QuantEmbedding(nn.Module):
    """An embedding table [vocab, hidden] stored quantized: only the looked-up rows are dequantized.

    ``weight`` is an empty placeholder that carries the output dtype and the device (what
    ``LlamaModel.dtype`` and ``.device`` read); the table itself is ``qweight``.
    """

    def __init__(self, weight: _QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight = weight
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=weight.data.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.qweight
        rows = QuantizedTensor(q.data[ids], q.scale[ids], None if q.zero is None else q.zero[ids],
                               torch.Size((*ids.shape, q.shape[-1])), q.config)  # [..., hidden]
        return rows.dequantize(self.weight.dtype)


def quantize_model(model: nn.Module, config: QuantConfig, embeddings: bool = False) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`QuantLinear`.

    With ``embeddings=True`` a Llama model's embedding table and LM head are quantized too (one
    shared quantized tensor when they are tied). Returns the model.
    """
    if not isinstance(config, QuantConfig):
        raise WorkbenchError(f"config must be a QuantConfig, got {type(config).__name__}")
    head = getattr(model, "lm_head", None)
    embed = getattr(model, "embed_tokens", None)
    tied = head is not None and embed is not None and head.weight is embed.weight
    if embeddings and (head is None or embed is None):
        raise WorkbenchError("embeddings=True needs a model with embed_tokens and lm_head")
    skip_head = not embeddings or tied  # a tied head is converted below, with its embedding
    with torch.no_grad():
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and not (child is head and skip_head):
                    setattr(module, child_name, QuantLinear.from_linear(child, config))
        if embeddings:
            table = _QuantizedWeight(quantize(embed.weight, config))
            model.embed_tokens = QuantEmbedding(table, embed.weight.dtype)
            if tied:
                model.lm_head = QuantLinear(table)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: parameters and quantized buffers, shared tensors once."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.dtype in (torch.int8, torch.uint8) or t.is_floating_point():
            seen[t.data_ptr()] = t.numel() * t.element_size()
    for name, buf in model.named_buffers():  # non-weight buffers (rotary frequencies) excluded
        if name.endswith("inv_freq"):
            seen.pop(buf.data_ptr(), None)
    return sum(seen.values())


def weight_breakdown(model: nn.Module) -> dict[str, int]:
    """Weight bytes by part: ``codes`` (packed integers), ``scales`` (scales and offsets) and
    ``dense`` (everything left unquantized: norms, and embeddings unless quantized)."""
    tables = {id(m): m for m in model.modules() if isinstance(m, _QuantizedWeight)}.values()
    codes = sum(t.data.numel() * t.data.element_size() for t in tables)
    scales = sum(t.scale.numel() * t.scale.element_size()
                 + (0 if t.zero is None else t.zero.numel() * t.zero.element_size())
                 for t in tables)
    return {"codes": codes, "scales": scales, "dense": weight_bytes(model) - codes - scales}


def quantized_layers(model: nn.Module) -> list[QuantLinear]:
    """Every :class:`QuantLinear` of the model, in module order."""
    return [m for m in model.modules() if isinstance(m, QuantLinear)]
