"""The quantization paths on a CUDA GPU (skipped without one): the fused kernels (tinygemm int4,
int8 weight-only matmul), the CUDA-graph decode loop and the quantized KV cache on the device.

Run by tools/gpu/quant.sh on the GPU machine before ``bench quant``.
"""

import pytest
import torch

from tests.test_quant import TINY, FakeQuantKV, run_with_cache, scale_per_value
from workbench.kv.contiguous import ContiguousKVCache
from workbench.model.batch import ForwardBatch
from workbench.model.loading import load_model
from workbench.model.presets import random_model
from workbench.quant import QuantConfig, quantize
from workbench.quant.kernels import use_kernel
from workbench.quant.kv import KV_INT4, KV_INT8, QuantizedKVCache
from workbench.quant.linear import quantize_model
from workbench.quant.speed import greedy_decode, linear_sweep_seconds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("config", [QuantConfig(4, 64), QuantConfig(4, 32, False),
                                    QuantConfig(8, None, False)], ids=lambda c: c.name)
def test_round_trip_bound_on_the_gpu(config):
    x = torch.randn(64, 512, device="cuda")
    q = quantize(x, config)
    assert (x - q.dequantize()).abs().le(scale_per_value(q) / 2 * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("config,kernel", [(QuantConfig(8, None), "int8mm"),
                                           (QuantConfig(4, 64), "int4mm"),
                                           (QuantConfig(4, 128, False), "int4mm")],
                         ids=["int8mm", "int4mm-sym", "int4mm-asym"])
def test_fused_kernels_on_the_bundled_model(config, kernel):
    model = quantize_model(load_model("bundled", "cuda", torch.bfloat16), config)
    batch = ForwardBatch.prefill(torch.randint(1, 8192, (2, 32), device="cuda"))
    with torch.inference_mode():
        expected = model(batch).float()
        use_kernel(model, kernel)  # checks every layer against dequantize-then-matmul
        got = model(batch).float()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_cuda_graph_decode_gives_the_eager_tokens():
    model = random_model(TINY, "cuda", std=0.3, seed=1)
    prompt = torch.randint(8, 96, (3, 14))
    graphed, _ = greedy_decode(model, prompt, 12, graph=True)
    eager, _ = greedy_decode(model, prompt, 12, graph=False)
    assert torch.equal(graphed, eager)
    quantize_model(model, QuantConfig(8, None))
    use_kernel(model, "int8mm")
    graphed, _ = greedy_decode(model, prompt, 12, graph=True)
    eager, _ = greedy_decode(model, prompt, 12, graph=False)
    assert torch.equal(graphed, eager)
    assert linear_sweep_seconds(model, repeats=3) > 0


@pytest.mark.parametrize("quant", [KV_INT8, KV_INT4], ids=["int8", "int4"])
def test_quantized_kv_cache_on_the_gpu(quant):
    model = random_model(TINY, "cuda", std=0.05, seed=3)
    ids = torch.randint(0, 96, (2, 20), device="cuda")
    fake = lambda b, n: FakeQuantKV(model.config, b, n, "cuda", quant=quant)  # noqa: E731
    quantized = lambda b, n: QuantizedKVCache(model.config, b, n, "cuda", quant=quant)  # noqa: E731
    plain = lambda b, n: ContiguousKVCache(model.config, b, n, "cuda")  # noqa: E731
    with torch.inference_mode():
        reference = run_with_cache(model, ids, fake, [20])
        got = run_with_cache(model, ids, quantized, [12] + [1] * 8)
        expected = run_with_cache(model, ids, plain, [20])
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    assert (got - expected).abs().max() < 0.15 * expected.abs().max()
