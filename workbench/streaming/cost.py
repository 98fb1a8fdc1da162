"""How much faster than recomputation can a rolling KV cache be? The roofline answer (notebook 08).

Per new token, with a budget of W keys:

* **rolling cache** (StreamingLLM): one decode step, ``2 P`` FLOP for P parameters plus attention
  over W keys, while reading every weight byte and the W cached keys/values: memory-bound;
* **recomputation**: one forward pass over W tokens, about ``2 P W`` FLOP (plus ``2 H d W^2`` of
  causal attention per layer) while reading the weights once: compute-bound for large W.

So the roofline's estimate of the speed-up is about
``min(W, W * bandwidth * 2 / (peak * bytes_per_weight))``: W divided by the ridge point (in FLOP
per weight byte). A GPU with a high ridge (an H100 in
bfloat16: several hundred FLOP/byte) gains far less than W from caching, a CPU with a low
ridge gains almost all of it. The paper's 22.2x (A6000, Llama-2-7B, cache 4,096) sits on this line.
Kernel-launch overheads, which dominate small models on GPUs, are not in it.
"""

from __future__ import annotations

from workbench.model.config import ModelConfig
from workbench.roofline import Roofline


def step_costs(config: ModelConfig, window: int, bytes_per_element: int) -> dict[str, dict]:
    """FLOP and bytes of one new token: ``{"cache": ..., "recompute": ...}``, each
    ``{"flops", "nbytes"}``, with a full budget of ``window`` keys."""
    P = config.num_parameters()
    L, H, Hkv, d = (config.num_hidden_layers, config.num_attention_heads,
                    config.num_key_value_heads, config.head_dim)
    head = config.vocab_size * config.hidden_size  # LM head: one row of logits either way
    body = P - config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    weights = P * bytes_per_element
    kv = 2 * L * Hkv * d * window * bytes_per_element
    cache = {"flops": 2 * (body + head) + 4 * L * H * d * window, "nbytes": weights + kv}
    recompute = {"flops": 2 * body * window + 2 * head + 2 * L * H * d * window * window,
                 "nbytes": weights + window * config.hidden_size * bytes_per_element}
    return {"cache": cache, "recompute": recompute}


def roofline_speedup(config: ModelConfig, window: int, roofline: Roofline,
                  bytes_per_element: int) -> float:
    """Recomputation's time floor over the rolling cache's, per token: the speed-up the roofline
    predicts (an estimate: each floor bounds its own time, not their ratio)."""
    costs = step_costs(config, window, bytes_per_element)
    floor = {name: roofline.time_floor(c["flops"], c["nbytes"]) for name, c in costs.items()}
    return floor["recompute"] / floor["cache"]
