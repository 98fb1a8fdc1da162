"""Group-wise int8/int4 quantization of weights and of the KV cache (notebook ``07_quantization``).

``groupwise``: :class:`QuantConfig`, :class:`QuantizedTensor`, :func:`quantize` (packed storage);
``linear``: :class:`QuantLinear` and :func:`quantize_model` (weight-only quantization of a model);
``kv``: :class:`QuantizedKVCache` (keys/values stored quantized); ``kernels``: fused matmuls;
``eval``: perplexity and logit error; ``speed``: decode timing; ``bench``: ``bench quant``'s rows.
"""

from workbench.quant.groupwise import QuantConfig, QuantizedTensor, quantize

__all__ = ["QuantConfig", "QuantizedTensor", "quantize"]
