"""Our Llama/Qwen2 forward pass and static generation against Hugging Face transformers.

Every checkpoint here is written by transformers itself (``save_pretrained``), so the tests also
check that we read real HF checkpoints: names, tied heads, biases, sharded indexes, both ways of
writing RoPE settings. Two properties are checked per shape:

(a) fp32 logits of a prefill match ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` to 1e-4 (relative to
    the largest logit);
(b) greedy tokens of ``generate_static`` (left-padded batches, batch size 1 and > 1) equal HF
    ``generate(do_sample=False)`` run on each prompt alone.

Then the bundled model (c) and our ``save_checkpoint`` round trip (d).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.helpers import torch_threads  # noqa: E402
from workbench.engine import EngineConfig, Request, generate_static, run_continuous  # noqa: E402
from workbench.model import ForwardBatch, LlamaModel, load_model, load_tokenizer  # noqa: E402
from workbench.model.loading import resolve_model_dir, save_checkpoint  # noqa: E402
from workbench.model.rope import inverse_frequencies  # noqa: E402

transformers.logging.set_verbosity_error()  # "Loading weights" bars and generation-config notes

# Random-init weights are drawn with std 0.2 (HF's default initializer_range is 0.02). At 0.02 the
# logits of a random model are almost flat (top-2 gaps ~1e-3), so two correct fp32 implementations
# that sum in a different order could pick different argmaxes and the greedy comparison would be
# flaky; at 0.2 the logits spread over several units and greedy decoding is decisive. Biases and
# RMSNorm weights (HF initialises them to 0 and 1) are randomised too, so that loading them is
# actually tested.
INIT_STD = 0.2

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # tiny original context: wavelengths above 16 positions are scaled, those in 4..16 are
          # blended, so the scaling changes the rotation angles at the positions used below
          "original_max_position_embeddings": 16}


def _rope(theta: float, scaling: dict | None = None) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta} if scaling is None else {
        **scaling, "rope_theta": theta}


# id -> (architecture, config kwargs, save_pretrained kwargs)
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "mha-d32-1layer-untied": ("llama", dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
        num_hidden_layers=1, tie_word_embeddings=False, vocab_size=256), {}),
    "gqa2-d64-2layers-tied": ("llama", dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=2, tie_word_embeddings=True, rms_norm_eps=1e-5), {}),
    # head_dim 128 != hidden 128 / 4 heads; rope_theta of Llama 3
    "gqa4-d128-headdim-ne-hidden-llama3": ("llama", dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
        num_hidden_layers=2, tie_word_embeddings=False,
        rope_parameters=_rope(500000.0, LLAMA3)), {}),
    "gqa8-d32-4layers-tied-llama3": ("llama", dict(
        hidden_size=256, num_attention_heads=8, num_key_value_heads=1, head_dim=32,
        num_hidden_layers=4, tie_word_embeddings=True, vocab_size=512,
        rope_parameters=_rope(10000.0, {**LLAMA3, "factor": 4.0, "high_freq_factor": 2.0})),
        {}),
    "qwen2-gqa2-d32-tied": ("qwen2", dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_hidden_layers=2, tie_word_embeddings=True, rope_parameters=_rope(1000000.0)), {}),
    "qwen2-gqa4-d64-untied-3layers": ("qwen2", dict(
        hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=3, tie_word_embeddings=False), {}),
    # Llama's attention_bias puts biases on q, k, v and o; mlp_bias on gate, up and down
    "llama-attn-mlp-bias-gqa2": ("llama", dict(
        hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
        num_hidden_layers=3, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        {}),
    "sharded-gqa2-d64-llama3": ("llama", dict(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=2, tie_word_embeddings=False, rope_parameters=_rope(10000.0, LLAMA3)),
        {"max_shard_size": "100KB"}),
}

PROMPT_LENGTHS = (7, 1, 13, 4, 9)  # different lengths: batches are left-padded
MAX_NEW = 10
SEQ_LEN = 24  # positions 0..23 in the logits test (beyond original_max_position_embeddings)


@dataclass
class Case:
    name: str
    dir: Path
    hf: torch.nn.Module
    ours: LlamaModel
    prompts: list[list[int]]
    _hf_greedy: list[list[int]] | None = field(default=None, repr=False)

    @property
    def eos(self) -> int:
        return self.ours.config.eos_token_ids[0]

    def hf_greedy(self) -> list[list[int]]:
        """HF ``generate`` of each prompt alone (no padding), cached across tests."""
        if self._hf_greedy is None:
            self._hf_greedy = [hf_generate(self.hf, p, MAX_NEW, self.eos) for p in self.prompts]
        return self._hf_greedy


def hf_generate(hf: torch.nn.Module, prompt: list[int], max_new: int, eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                      do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def build_hf_model(arch: str, kwargs: dict[str, Any], seed: int) -> torch.nn.Module:
    base = dict(vocab_size=384, intermediate_size=256, max_position_embeddings=256,
                initializer_range=INIT_STD, rms_norm_eps=1e-6, bos_token_id=None,
                pad_token_id=None)
    base.update(kwargs)
    # EOS = the last id: a random model rarely emits it, and if it does both sides stop there
    base["eos_token_id"] = base["vocab_size"] - 1
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (
        LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**base)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, INIT_STD)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory) -> Case:
    arch, kwargs, save_kwargs = CASES[request.param]
    seed = list(CASES).index(request.param)
    hf = build_hf_model(arch, kwargs, seed)
    out = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(out, **save_kwargs)
    ours = load_model(out)
    gen = torch.Generator().manual_seed(seed)
    vocab = ours.config.vocab_size
    prompts = [torch.randint(0, vocab - 1, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    return Case(request.param, out, hf, ours, prompts)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * scale, f"max |logit diff| {diff:.3g} > 1e-4 * {scale:.3g}"


# --------------------------------------------------------------------------- (a) logits


def test_config_read_from_hf_checkpoint(case: Case) -> None:
    raw = json.loads((case.dir / "config.json").read_text())
    c = case.ours.config
    hf_c = case.hf.config
    assert c.model_type == raw["model_type"]
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        hf_c.num_attention_heads, hf_c.num_key_value_heads, hf_c.head_dim)
    assert c.tie_word_embeddings == hf_c.tie_word_embeddings
    assert c.qkv_bias == (raw["model_type"] == "qwen2" or raw.get("attention_bias", False))
    assert c.mlp_bias == raw.get("mlp_bias", False)
    assert c.eos_token_ids == (hf_c.eos_token_id,)
    scaling = hf_c.rope_parameters.get("rope_type") == "llama3"
    assert (c.rope_scaling is not None) == scaling
    assert c.rope_theta == hf_c.rope_parameters["rope_theta"]
    if c.rope_scaling is not None:
        # guard for the test itself: llama3 scaling must change the angles within SEQ_LEN
        plain = inverse_frequencies(dataclasses.replace(c, rope_scaling=None))
        angle_gap = (SEQ_LEN - 1) * (plain - case.ours.inv_freq).abs().max().item()
        assert angle_gap > 1.0, f"scaling moves the last position by only {angle_gap:.3g} rad"
    if c.tie_word_embeddings:
        assert case.ours.lm_head.weight is case.ours.embed_tokens.weight
    if "sharded" in case.name:
        assert (case.dir / "model.safetensors.index.json").is_file()
        assert len(list(case.dir.glob("*.safetensors"))) > 1


def test_prefill_logits_match_hf(case: Case) -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, case.ours.config.vocab_size, (3, SEQ_LEN), generator=gen)
    with torch.inference_mode():
        ref = case.hf(ids).logits
        ours = case.ours(ForwardBatch.prefill(ids))
        last = case.ours(ForwardBatch.prefill(ids), last_only=True)
    assert_logits_close(ours, ref)
    assert_logits_close(last, ref[:, -1])


# --------------------------------------------------------------------------- (b) greedy generation


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_generation_matches_hf(case: Case, batch_size: int) -> None:
    run = generate_static(case.ours, case.prompts, MAX_NEW, batch_size=batch_size)
    expected = case.hf_greedy()
    got = [o.output_ids for o in run.outputs]
    assert got == expected
    for out, exp in zip(run.outputs, expected):
        reason = "eos" if exp and exp[-1] == case.eos else "length"
        assert out.finish_reason == reason


@pytest.mark.parametrize("kv", ["contiguous", "paged"])
def test_continuous_engine_matches_hf(case: Case, kv: str) -> None:
    """Continuous batching over either KV storage; the paged pool is small enough that
    sequences get preempted and recomputed, and prompts share a prefix (prefix cache)."""
    head = case.prompts[2][:8]
    prompts = case.prompts + [head + p for p in case.prompts[:2]]
    requests = [Request(tuple(p), MAX_NEW, id=i) for i, p in enumerate(prompts)]
    paged = dict(kv="paged", block_size=4, num_blocks=9, prefix_caching=True) if kv == "paged" \
        else {}
    config = EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, chunked_prefill=True, **paged)
    run = run_continuous(case.ours, requests, config)
    expected = case.hf_greedy() + [hf_generate(case.hf, p, MAX_NEW, case.eos)
                                   for p in prompts[len(case.prompts):]]
    assert [t.output_ids for t in run.traces] == expected


# --------------------------------------------------------------------------- (c) bundled model

CODE_PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):",
                "for i in range(10):"]
BUNDLED_NEW = 40


@pytest.fixture(scope="module", params=["bundled", "bundled-sinks"])
def bundled(request):
    """Each model shipped in data/models: the project's and the one with attention sinks."""
    ours = load_model(request.param)
    hf = LlamaForCausalLM.from_pretrained(str(resolve_model_dir(request.param)),
                                          dtype=torch.float32).eval()
    tok = load_tokenizer(request.param)
    return ours, hf, tok


def test_bundled_logits_match_hf(bundled) -> None:
    ours, hf, tok = bundled
    gen = torch.Generator().manual_seed(0)
    code = torch.tensor([tok.encode(CODE_PROMPTS[0] + "\n    if n < 2:\n        return n\n")])
    for ids in (code, torch.randint(0, ours.config.vocab_size, (2, 48), generator=gen)):
        with torch.inference_mode():
            assert_logits_close(ours(ForwardBatch.prefill(ids)), hf(ids).logits)


def test_bundled_greedy_code_matches_hf(bundled) -> None:
    ours, hf, tok = bundled
    prompts = [tok.encode(p) for p in CODE_PROMPTS]
    eos = ours.config.eos_token_ids[0]
    expected = [hf_generate(hf, p, BUNDLED_NEW, eos) for p in prompts]
    for batch_size in (4, 3):
        run = generate_static(ours, prompts, BUNDLED_NEW, batch_size=batch_size)
        assert [o.output_ids for o in run.outputs] == expected, batch_size
    assert all(len(e) == BUNDLED_NEW or e[-1] == eos for e in expected)
    # the trained model writes Python, not noise (guards against a test on garbage weights)
    assert "\n" in tok.decode(expected[0])


# --------------------------------------------------------------------------- (d) save_checkpoint


@pytest.mark.parametrize("source", ["bundled", "qwen2-gqa2-d32-tied",
                                    "llama-attn-mlp-bias-gqa2", "sharded-gqa2-d64-llama3"])
def test_save_checkpoint_round_trip_through_hf(source: str, tmp_path: Path,
                                               tmp_path_factory) -> None:
    if source == "bundled":
        ours = load_model("bundled")
    else:
        arch, kwargs, _ = CASES[source]
        src = tmp_path_factory.mktemp("src")
        build_hf_model(arch, kwargs, seed=7).save_pretrained(src)
        ours = load_model(src)
    save_checkpoint(ours, tmp_path, dtype=torch.float32)

    # the files are what HF expects: fp32 tensors under HF names, no duplicated tied head
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert all(f.get_tensor(n).dtype == torch.float32 for n in names)
    assert "model.embed_tokens.weight" in names
    assert ("lm_head.weight" in names) != ours.config.tie_word_embeddings

    model_cls = Qwen2ForCausalLM if ours.config.model_type == "qwen2" else LlamaForCausalLM
    hf = model_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, SEQ_LEN),
                        generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert_logits_close(ours(ForwardBatch.prefill(ids)), hf(ids).logits)

    again = load_model(tmp_path)
    assert again.config == ours.config
    for (name, a), (_, b) in zip(again.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_checkpoint_default_bf16(tmp_path: Path) -> None:
    ours = load_model("bundled")  # stored in bf16, so a bf16 save loses nothing
    save_checkpoint(ours, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_model(tmp_path)
    for (name, a), (_, b) in zip(again.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name
    assert math.isclose(again.config.rope_theta, ours.config.rope_theta)
