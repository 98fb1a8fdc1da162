"""Attention masks: which keys each query may see.

Padded and packed batch builders and the packed KV reference live in
:mod:`workbench.attention.packed` (import it directly: it depends on :mod:`workbench.kv`, which
imports this package).
"""

from workbench.attention.masks import (causal_mask, cu_seqlens, mask_text, packed_causal_mask,
                                       packed_positions, padded_causal_mask,
                                       padded_sliding_window_mask, segment_mask, sequence_ids,
                                       sliding_window_mask)

__all__ = ["causal_mask", "cu_seqlens", "mask_text", "packed_causal_mask", "packed_positions",
           "padded_causal_mask", "padded_sliding_window_mask", "segment_mask", "sequence_ids",
           "sliding_window_mask"]
