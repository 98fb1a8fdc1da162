"""Group-wise quantization: error bounds, packing, the dequantizing linear layer, quantized KV.

The quantized paths are checked against their plain counterparts: a QuantLinear against
``F.linear`` with the dequantized weight, the quantized KV cache against the contiguous one, and
the fused kernels against dequantize-then-matmul. Quantization changes numerics on purpose, so
greedy tokens of a quantized model are compared with the full-precision ones as an agreement rate.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import torch_threads
from workbench.errors import WorkbenchError
from workbench.kv.contiguous import ContiguousKVCache
from workbench.model import ModelConfig
from workbench.model.batch import ForwardBatch
from workbench.model.presets import random_model
from workbench.quant import QuantConfig, QuantizedTensor, quantize
from workbench.quant.groupwise import pack_int4, unpack_int4
from workbench.quant.kv import KV_INT4, KV_INT8, QuantizedKVCache
from workbench.quant.linear import (QuantEmbedding, QuantLinear, quantize_model,
                                    quantized_layers, weight_bytes)

CONFIGS = [QuantConfig(b, g, s) for b in (4, 8) for g in (32, 64, 128, None) for s in (True, False)]
TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   max_position_embeddings=96, eos_token_ids=(7,))


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def scale_per_value(q: QuantizedTensor) -> torch.Tensor:
    """Each value's own group scale, shaped like the original tensor."""
    return q.scale.float().repeat_interleave(q.config.group_size or q.shape[-1], dim=-1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_round_trip_error_within_half_a_step(config):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 256, generator=g) * torch.rand(3, 16, 1, generator=g) + 0.3
    x[0, 0, 5] = 40.0  # an outlier coarsens only its own group
    q = quantize(x, config)
    err = (x - q.dequantize()).abs()
    assert (err <= scale_per_value(q) / 2 * (1 + 1e-5) + 1e-7).all()
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert q.shape == x.shape and q.scale.shape == (3, 16, 256 // (config.group_size or 256))
    assert (q.zero is None) == config.symmetric


def test_grid_points_survive_exactly_and_zero_groups_stay_zero():
    codes = torch.arange(-7, 8, dtype=torch.float32).repeat(4, 1)[:, :14]  # [4, 14]
    x = torch.cat([codes * 0.5, torch.zeros(4, 2)], dim=1)  # [4, 16]: absmax 3.5 -> step 0.5
    x = torch.cat([x, torch.zeros(4, 16)], dim=1)  # second group all zeros
    q = quantize(x, QuantConfig(4, 16, scale_dtype=torch.float32))
    torch.testing.assert_close(q.dequantize(), x, atol=1e-6, rtol=1e-4)
    assert (q.dequantize()[:, 16:] == 0).all()


def test_packing_two_codes_per_byte():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert (packed[:, 0] == codes[:, 0] | (codes[:, 1] << 4)).all()  # low nibble first
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("bits,group,symmetric,bpv", [(4, 64, True, 4.25), (4, 64, False, 4.5),
                                                      (8, None, True, 8 + 16 / 256),
                                                      (4, 32, True, 4.5)])
def test_storage_bytes_include_scales(bits, group, symmetric, bpv):
    q = quantize(torch.randn(32, 256), QuantConfig(bits, group, symmetric))
    assert q.data.numel() == 32 * 256 * bits // 8
    assert q.bits_per_value == pytest.approx(bpv)
    assert q.nbytes == q.data.numel() + 2 * q.scale.numel() * (1 if symmetric else 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(bits=8, group_size=0), "group_size must be"),
    (dict(bits=4, group_size=33), "must be even"),
    (dict(bits=8, scale_dtype=torch.int8), "scale_dtype"),
])
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        QuantConfig(**kwargs)


def test_bad_tensors_are_rejected():
    with pytest.raises(WorkbenchError, match="not divisible by group_size 64"):
        quantize(torch.randn(4, 96), QuantConfig(8, 64))
    with pytest.raises(WorkbenchError, match="even last dimension"):
        quantize(torch.randn(4, 7), QuantConfig(4, None))
    with pytest.raises(WorkbenchError, match="floating-point"):
        quantize(torch.ones(4, 64, dtype=torch.int32), QuantConfig(8))
    with pytest.raises(WorkbenchError, match="float16 scales"):
        quantize(torch.full((1, 64), 1e9), QuantConfig(8))
    assert quantize(torch.full((1, 64), 1e9), QuantConfig(8, scale_dtype=torch.float32)).nbytes


@pytest.mark.parametrize("config", [QuantConfig(8, None), QuantConfig(4, 32, False)],
                         ids=lambda c: c.name)
def test_quant_linear_equals_linear_with_dequantized_weight(config):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    layer = QuantLinear.from_linear(linear, config)
    x = torch.randn(2, 5, 64)
    expected = F.linear(x, layer.weight(), linear.bias)
    torch.testing.assert_close(layer(x), expected)
    assert (layer.weight() - linear.weight).abs().max() <= layer.qweight.scale.float().max() / 2


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_model_equals_plain_model_with_dequantized_weights(tied):
    config = replace(TINY, tie_word_embeddings=tied, qkv_bias=True)
    model = random_model(config, std=0.3, seed=2)
    quantize_model(model, QuantConfig(4, 32, symmetric=False), embeddings=True)
    assert isinstance(model.embed_tokens, QuantEmbedding)
    assert (model.lm_head.qweight is model.embed_tokens.qweight) == tied
    assert len(quantized_layers(model)) == 2 * 7 + 1
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    plain = random_model(config, std=0.3, seed=2)  # the same weights, then W := W_hat
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                plain.get_submodule(name).weight.copy_(module.weight())
        plain.embed_tokens.weight.copy_(model.embed_tokens.qweight.tensor().dequantize())
    batch = ForwardBatch.prefill(torch.randint(0, 96, (2, 12)))
    with torch.inference_mode():
        torch.testing.assert_close(model(batch), plain(batch), atol=1e-5, rtol=1e-5)


def test_int4_weights_shrink_at_least_3_5x_against_bf16():
    model = random_model(TINY, dtype=torch.bfloat16)
    layers = lambda m: [mod for layer in m.layers for mod in layer.modules()  # noqa: E731
                        if isinstance(mod, (torch.nn.Linear, QuantLinear))]
    dense = sum(m.weight.numel() * 2 for m in layers(model))
    quantize_model(model, QuantConfig(4, 64))
    packed = sum(m.qweight.tensor().nbytes for m in layers(model))
    assert dense / packed == pytest.approx(2 * 8 / 4.25)  # 3.76x: 4 bits + a fp16 scale per 64
    assert weight_bytes(model) < sum(p.numel() * 2 for p in random_model(TINY).parameters())


def run_with_cache(model, ids, make_cache, chunks):
    """Logits of ``ids`` [B, T] fed in ``chunks`` (lengths) through one cache."""
    B, T = ids.shape
    kv = make_cache(B, T)
    out, start = [], 0
    for n in chunks:
        mask = torch.ones(B, 1, n, start + n, dtype=torch.bool,
                          device=ids.device).tril(start)  # [B, 1, n, S]
        positions = torch.arange(start, start + n, device=ids.device).expand(B, n)  # [B, n]
        batch = ForwardBatch(ids[:, start:start + n], positions, mask, kv_start=start)
        out.append(model(batch, kv))
        start += n
    return torch.cat(out, dim=1)  # [B, T, vocab]


class FakeQuantKV(ContiguousKVCache):
    """A dense cache that stores quantize-then-dequantize of each new key/value: the reference."""

    def __init__(self, *args, quant, **kwargs):
        super().__init__(*args, **kwargs)
        self.quant = quant

    def update(self, layer, k, v, batch):
        fake = lambda t: quantize(t, self.quant).dequantize(t.dtype)  # noqa: E731
        return super().update(layer, fake(k), fake(v), batch)


@pytest.mark.parametrize("quant,tol", [(KV_INT8, 0.02), (KV_INT4, 0.15)], ids=["int8", "int4"])
def test_quantized_kv_cache_matches_reference_and_stays_close_to_plain(quant, tol):
    model = random_model(TINY, std=0.05, seed=3)
    ids = torch.randint(0, 96, (2, 20))
    plain = lambda b, n: ContiguousKVCache(model.config, b, n)  # noqa: E731
    fake = lambda b, n: FakeQuantKV(model.config, b, n, quant=quant)  # noqa: E731
    quantized = lambda b, n: QuantizedKVCache(model.config, b, n, quant=quant)  # noqa: E731
    with torch.inference_mode():
        expected = run_with_cache(model, ids, plain, [20])
        reference = run_with_cache(model, ids, fake, [20])
        at_once = run_with_cache(model, ids, quantized, [20])
        stepwise = run_with_cache(model, ids, quantized, [12] + [1] * 8)
    torch.testing.assert_close(at_once, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepwise, at_once, atol=1e-4, rtol=1e-4)  # chunking-invariant
    assert 0 < (at_once - expected).abs().max() < tol * expected.abs().max()


def test_quantized_kv_cache_memory_and_bad_group():
    dense = ContiguousKVCache(TINY, 4, 64, dtype=torch.bfloat16).nbytes()
    assert dense / QuantizedKVCache(TINY, 4, 64, quant=KV_INT8).nbytes() == pytest.approx(
        2 * 32 / (32 + 2))  # per token and head: 32 bf16 values vs 32 codes + a fp16 scale
    assert dense / QuantizedKVCache(TINY, 4, 64, quant=KV_INT4).nbytes() == pytest.approx(3.2)
    with pytest.raises(WorkbenchError, match="not divisible by group_size 64"):
        QuantizedKVCache(TINY, 1, 8, quant=QuantConfig(4, 64))
