"""Attention masks: which keys each query may see."""

from workbench.attention.masks import causal_mask, padded_causal_mask

__all__ = ["causal_mask", "padded_causal_mask"]
