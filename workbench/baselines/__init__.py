"""The Hugging Face peers that the batching benchmarks run beside the workbench, on the same workload.

``hf_static`` is transformers ``generate`` over static, left-padded batches; ``hf_continuous`` is
transformers' own continuous batching (paged KV cache, FIFO scheduler). Both take the workbench's
:class:`~workbench.engine.requests.Request` list and return one
:class:`~workbench.engine.requests.RequestTrace` per request, in the order given, so that one metrics
function scores every system alike (notebook 02).
"""

from workbench.baselines.hf import hf_continuous, hf_static, load_hf_model

__all__ = ["hf_continuous", "hf_static", "load_hf_model"]
