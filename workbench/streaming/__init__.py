"""StreamingLLM (Xiao et al., 2023): attention sinks + a rolling window, for endless streams.

* :mod:`workbench.streaming.cache`: :class:`SinkKVCache`, the rolling KV cache with positions
  assigned within the cache (keys cached before RoPE);
* :mod:`workbench.streaming.score`: a long held-out stream scored by the four methods compared
  in the paper (dense, window, sliding window with recomputation, sinks + window), perplexity per
  position and time per token;
* :mod:`workbench.streaming.probe`: the model's attention probabilities, to see the sinks.

Taught in notebook ``08_streaming_llm``; measured by ``workbench bench streaming``.
"""

from workbench.streaming.cache import SinkKVCache, StreamingConfig

__all__ = ["SinkKVCache", "StreamingConfig"]
