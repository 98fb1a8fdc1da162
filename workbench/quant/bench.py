"""The measurements behind ``bench quant``: memory, quality and decode speed per setting.

A *setting* is a weight format (bf16/fp32 baseline, or a :class:`QuantConfig`), the matmul that
runs it (dequantize-then-matmul, or a fused kernel from :mod:`workbench.quant.kernels`) and
whether the embedding table and LM head are quantized too. Each one is measured on two models:

* the *quality model* (the bundled model, trained): held-out perplexity, max logit error and top-1
  agreement against the unquantized model in the same dtype;
* the *speed model* (e.g. ``preset:llama-3.2-1b``, random weights: speed depends on shapes only):
  weight bytes, greedy decode tok/s and the time of one step's linear layers, against the
  bandwidth floor ``bytes read per step / measured bandwidth``.

KV-cache settings are measured for memory and perplexity (the cache is what changes, not the
matmuls). Used by :mod:`workbench.bench.quant_cli` and notebook ``07_quantization``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.model.llama import LlamaModel
from workbench.model.loading import PRESET_PREFIX, load_model, resolve_model_dir
from workbench.model.presets import preset_config
from workbench.quant.eval import EvalResult, evaluate, heldout_windows, reference_logits
from workbench.quant.groupwise import QuantConfig
from workbench.quant.kernels import use_kernel
from workbench.quant.kv import QuantizedKVCache
from workbench.quant.linear import quantize_model, quantized_layers, weight_bytes
from workbench.quant.speed import decode_tok_s, linear_sweep_seconds


@dataclass(frozen=True)
class WeightSetting:
    """One weight format: ``config`` None is the unquantized baseline."""

    config: QuantConfig | None = None
    kernel: str | None = None  # None: dequantize then matmul
    embeddings: bool = False

    @property
    def system(self) -> str:
        if self.config is None:
            return "baseline"
        return (self.config.name + ("+emb" if self.embeddings else "")
                + f"/{self.kernel or 'dequant'}")

    def build(self, model: str, device: torch.device, dtype: torch.dtype) -> LlamaModel:
        """Load ``model`` and apply this setting (kernels are checked against dequantization)."""
        net = load_model(model, device, dtype)
        if self.config is not None:
            quantize_model(net, self.config, embeddings=self.embeddings)
            if self.kernel is not None:
                use_kernel(net, self.kernel, dtype=dtype)
        return net


@dataclass
class QualityProbe:
    """Held-out windows, the reference logits and the baseline's result on the quality model."""

    model: str
    device: torch.device
    dtype: torch.dtype
    num_windows: int = 16
    seq_len: int = 256
    windows: torch.Tensor = field(init=False, repr=False)
    reference: torch.Tensor = field(init=False, repr=False)
    baseline: EvalResult = field(init=False)

    def __post_init__(self) -> None:
        from workbench.model.loading import load_tokenizer

        tokenizer = load_tokenizer(self.model)
        if tokenizer is None:
            raise WorkbenchError(f"the quality model {self.model} has no tokenizer (presets are "
                                 "random weights): use a trained checkpoint such as 'bundled'")
        self.windows = heldout_windows(tokenizer, self.num_windows, self.seq_len)
        base = load_model(self.model, self.device, self.dtype)
        self.reference = reference_logits(base, self.windows)
        self.baseline = evaluate(base, self.windows, self.reference)

    def measure(self, model: LlamaModel, kv_factory=None) -> dict:
        r = evaluate(model, self.windows, self.reference, kv_factory=kv_factory)
        return {"perplexity": r.perplexity,
                "ppl_change": r.perplexity / self.baseline.perplexity - 1,
                "max_logit_error": r.max_logit_error, "top1_agreement": r.top1_agreement,
                "ppl_tokens": r.tokens}


def linear_bytes(model: LlamaModel) -> int:
    """Bytes of the decoder layers' linear weights (what weight-only quantization targets)."""
    total = 0
    for layer in model.layers:
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                total += m.weight.numel() * m.weight.element_size()
    for m in quantized_layers(model):
        if m is not getattr(model, "lm_head", None):
            total += m.qweight.tensor().nbytes
    return total


def step_bytes(model: LlamaModel) -> int:
    """Bytes one decode step reads at batch 1: every weight, except an untied embedding table
    (a step reads one row of it)."""
    if model.config.tie_word_embeddings:
        return weight_bytes(model)
    table = model.embed_tokens
    embed = (table.qweight.tensor().nbytes if hasattr(table, "qweight")
             else table.weight.numel() * table.weight.element_size())
    return weight_bytes(model) - embed


def model_config(model: str) -> ModelConfig:
    """The config of ``model`` (bundled, a directory or a preset) without loading weights."""
    if model.startswith(PRESET_PREFIX):
        return preset_config(model.removeprefix(PRESET_PREFIX))
    return ModelConfig.from_file(resolve_model_dir(model) / "config.json")


def dense_params(config: ModelConfig, linear_only: bool = False) -> int:
    """Parameters of the unquantized model (tied weights once), or of its decoder layers' linear
    layers only."""
    with torch.device("meta"):
        model = LlamaModel(config)
    if linear_only:
        return sum(m.weight.numel() for layer in model.layers for m in layer.modules()
                   if isinstance(m, torch.nn.Linear))
    return sum(p.numel() for p in model.parameters())


def measure_weights(setting: WeightSetting, speed_model: str, probe: QualityProbe | None,
                    device: torch.device, dtype: torch.dtype, bandwidth: float,
                    batch_sizes: tuple[int, ...] = (1,), prompt_len: int = 128,
                    steps: int = 64) -> dict:
    """One result row: memory and speed on the speed model, quality on the probe's model."""
    row: dict = {"system": setting.system, "kind": "weights",
                 "quant": None if setting.config is None else setting.config.name,
                 "kernel": setting.kernel, "embeddings_quantized": setting.embeddings}
    net = setting.build(speed_model, device, dtype)
    row |= {"weight_bytes": weight_bytes(net), "linear_weight_bytes": linear_bytes(net),
            "bf16_weight_bytes": 2 * dense_params(net.config),
            "bf16_linear_weight_bytes": 2 * dense_params(net.config, linear_only=True)}
    row["compression_vs_bf16"] = row["bf16_weight_bytes"] / row["weight_bytes"]
    row["linear_compression_vs_bf16"] = row["bf16_linear_weight_bytes"] / row["linear_weight_bytes"]
    read = step_bytes(net)
    row["decode"] = []
    for b in batch_sizes:
        tok_s = decode_tok_s(net, b, prompt_len, steps)
        floor = b * bandwidth / read  # tokens/s if the step only read its weights once
        row["decode"].append({"batch_size": b, "output_tok_s": tok_s, "floor_tok_s": floor,
                              "fraction_of_floor": tok_s / floor})
    row["output_tok_s"] = row["decode"][0]["output_tok_s"]
    sweep = linear_sweep_seconds(net)
    row |= {"linear_sweep_ms": sweep * 1e3, "linear_sweep_GB_s": linear_bytes(net) / sweep / 1e9}
    del net
    if probe is not None:
        try:
            row |= probe.measure(setting.build(probe.model, device, dtype))
        except (WorkbenchError, RuntimeError) as err:  # e.g. a kernel that rejects its shapes
            row["quality_error"] = str(err).splitlines()[0][:300]
    return row


def measure_kv(quant: QuantConfig | None, speed_model: str, probe: QualityProbe | None,
               device: torch.device, dtype: torch.dtype, context: int = 4096) -> dict:
    """One KV row: cache bytes for ``context`` tokens of the speed model, quality on the probe."""
    from workbench.kv.contiguous import ContiguousKVCache

    config = model_config(speed_model)
    dense = ContiguousKVCache(config, 1, context, "meta", torch.bfloat16).nbytes()
    if quant is None:
        kv_bytes, make = ContiguousKVCache(config, 1, context, "meta", dtype).nbytes(), None
    else:
        kv_bytes = QuantizedKVCache(config, 1, context, "meta", quant=quant).nbytes()
    row = {"system": f"kv/{'baseline' if quant is None else quant.name}", "kind": "kv",
           "quant": None if quant is None else quant.name, "context": context,
           "kv_bytes": kv_bytes, "kv_bytes_per_token": kv_bytes / context,
           "compression_vs_bf16": dense / kv_bytes}
    if probe is not None:
        model = load_model(probe.model, device, dtype)
        if quant is not None:
            def make(b: int, n: int) -> QuantizedKVCache:
                return QuantizedKVCache(model.config, b, n, device, dtype, quant=quant)
        row |= probe.measure(model, make)
    return row
