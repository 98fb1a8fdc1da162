"""Bad checkpoints and configs fail with a WorkbenchError that says what is wrong, nothing else.

Each test writes a small valid checkpoint with our own ``save_checkpoint`` (no transformers needed)
and then breaks exactly one thing about it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import tiny_config, write_tiny_checkpoint
from workbench.errors import WorkbenchError
from workbench.model import ModelConfig, RopeScaling, load_model
from workbench.model.loading import read_state_dict, resolve_model_dir, safetensors_files

WEIGHTS = "model.safetensors"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A valid 2-layer checkpoint directory (fp32, untied head)."""
    out = tmp_path / "ckpt"
    write_tiny_checkpoint(out)
    return out


def config_dict(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "config.json").read_text())


def write_config(ckpt: Path, raw: Any) -> None:
    (ckpt / "config.json").write_text(json.dumps(raw))


def load_fails(path: Path, *fragments: str) -> WorkbenchError:
    """load_model(path) raises WorkbenchError whose message contains every fragment."""
    with pytest.raises(WorkbenchError) as info:
        load_model(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message.strip(), "the CLI prints one line"
    return info.value


def test_valid_checkpoint_loads(ckpt: Path) -> None:
    model = load_model(ckpt)
    assert model.config == tiny_config()
    assert safetensors_files(ckpt) == [ckpt / WEIGHTS]
    assert resolve_model_dir(ckpt) == ckpt


# --------------------------------------------------------------------------- directory and config


def test_missing_directory(tmp_path: Path) -> None:
    load_fails(tmp_path / "nope", "not found", "nope")


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    load_fails(tmp_path / "file", "not found")


def test_directory_without_config(tmp_path: Path, ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    load_fails(ckpt, "no config.json", str(ckpt))


@pytest.mark.parametrize("text", ["{not json", "", '{"model_type": "llama",}'])
def test_config_not_json(ckpt: Path, text: str) -> None:
    (ckpt / "config.json").write_text(text)
    load_fails(ckpt, "config.json", "not valid JSON")


def test_config_not_an_object(ckpt: Path) -> None:
    write_config(ckpt, [1, 2, 3])
    load_fails(ckpt, "JSON object")


def test_config_binary_garbage(ckpt: Path) -> None:
    (ckpt / "config.json").write_bytes(b"\xff\xfe\x00\x81garbage")
    load_fails(ckpt, "config.json")


@pytest.mark.parametrize("model_type", ["gpt2", "mistral", None])
def test_unsupported_model_type(ckpt: Path, model_type: str | None) -> None:
    raw = config_dict(ckpt) | {"model_type": model_type, "architectures": ["GPT2LMHeadModel"]}
    write_config(ckpt, raw)
    load_fails(ckpt, "unsupported model_type", repr(model_type), "llama")


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size",
                                 "num_hidden_layers", "num_attention_heads"])
def test_missing_required_key(ckpt: Path, key: str) -> None:
    raw = config_dict(ckpt)
    del raw[key]
    write_config(ckpt, raw)
    load_fails(ckpt, "missing the key", repr(key))


@pytest.mark.parametrize("key, value, fragment", [
    ("hidden_size", "wide", "malformed value"),
    ("vocab_size", None, "malformed value"),
    ("num_hidden_layers", 0, "num_hidden_layers must be a positive integer"),
    ("intermediate_size", -8, "intermediate_size must be a positive integer"),
    ("num_key_value_heads", 3, "multiple of num_key_value_heads"),
    ("head_dim", 7, "head_dim must be even"),
    ("hidden_act", "gelu", "unsupported hidden_act"),
    ("use_sliding_window", True, "sliding-window"),
])
def test_bad_config_value(ckpt: Path, key: str, value: Any, fragment: str) -> None:
    write_config(ckpt, config_dict(ckpt) | {key: value})
    load_fails(ckpt, fragment)


def test_zero_attention_heads_without_head_dim(ckpt: Path) -> None:
    raw = config_dict(ckpt) | {"num_attention_heads": 0}
    del raw["head_dim"]
    write_config(ckpt, raw)
    load_fails(ckpt, "num_attention_heads")


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
    {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
])
def test_unknown_rope_type(ckpt: Path, rope: dict[str, Any]) -> None:
    write_config(ckpt, config_dict(ckpt) | rope)
    load_fails(ckpt, "unsupported RoPE type", "llama3")


@pytest.mark.parametrize("field", ["factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings"])
def test_llama3_rope_missing_field(ckpt: Path, field: str) -> None:
    params = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    del params[field]
    write_config(ckpt, config_dict(ckpt) | {"rope_parameters": params, "rope_scaling": None})
    load_fails(ckpt, "missing the key", repr(field))


def test_rope_parameters_not_a_dict(ckpt: Path) -> None:
    write_config(ckpt, config_dict(ckpt) | {"rope_parameters": "llama3"})
    load_fails(ckpt, "rope")


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("keep", ["empty", 3, 8, 40, "header", "half", "all_but_one"])
def test_truncated_safetensors(ckpt: Path, keep: str | int) -> None:
    path = ckpt / WEIGHTS
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    n = {"empty": 0, "header": header, "half": len(data) // 2,
         "all_but_one": len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:n])
    load_fails(ckpt, "cannot read", str(path), "corrupt or truncated")


@pytest.mark.parametrize("garbage", [
    bytes(range(256)) * 8,  # absurd header length
    (16).to_bytes(8, "little") + b"this is not json" + b"\0" * 64,  # plausible length, bad JSON
    b"PK\x03\x04" + b"\0" * 200,  # a zip (what torch.save writes)
], ids=["random", "bad-header-json", "zip"])
def test_garbage_safetensors(ckpt: Path, garbage: bytes) -> None:
    (ckpt / WEIGHTS).write_bytes(garbage)
    load_fails(ckpt, "cannot read", WEIGHTS)


def _rewrite(ckpt: Path, edit) -> None:
    state = load_file(str(ckpt / WEIGHTS))
    edit(state)
    save_file(state, str(ckpt / WEIGHTS), metadata={"format": "pt"})


def test_missing_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, lambda s: s.pop("model.layers.1.mlp.down_proj.weight"))
    load_fails(ckpt, "does not match its config", "missing", "layers.1.mlp.down_proj.weight")


def test_missing_lm_head_when_untied(ckpt: Path) -> None:
    _rewrite(ckpt, lambda s: s.pop("lm_head.weight"))
    load_fails(ckpt, "missing", "lm_head.weight")


def test_unexpected_tensor(ckpt: Path) -> None:
    _rewrite(ckpt, lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}))
    load_fails(ckpt, "unexpected", "layers.2.mlp.up_proj.weight")


def test_bias_in_checkpoint_but_not_in_config(ckpt: Path) -> None:
    _rewrite(ckpt, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    load_fails(ckpt, "unexpected", "q_proj.bias")


def test_wrong_shape(ckpt: Path) -> None:
    _rewrite(ckpt, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight":
                                       torch.zeros(24, 32)}))
    load_fails(ckpt, "layers.0.self_attn.k_proj.weight", "(24, 32)", "(16, 32)")


def test_config_disagrees_with_weights(ckpt: Path) -> None:
    write_config(ckpt, config_dict(ckpt) | {"intermediate_size": 96})
    load_fails(ckpt, "mlp", "(64, 32)", "(96, 32)")


def _shard(ckpt: Path) -> dict[str, str]:
    """Split model.safetensors into two shards with an HF index; return the weight map."""
    state = load_file(str(ckpt / WEIGHTS))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(ckpt / file), metadata={"format": "pt"})
        weight_map |= {k: file for k in keys}
    (ckpt / WEIGHTS).unlink()
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads_the_same(ckpt: Path) -> None:
    whole = load_model(ckpt)
    _shard(ckpt)
    assert len(safetensors_files(ckpt)) == 2
    sharded = load_model(ckpt)
    for (name, a), (_, b) in zip(whole.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_index_names_missing_shard(ckpt: Path) -> None:
    _shard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    load_fails(ckpt, "model.safetensors.index.json", "missing",
               "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("index", ["{broken", json.dumps({"metadata": {}}), "[]"])
def test_malformed_index(ckpt: Path, index: str) -> None:
    _shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(index)
    load_fails(ckpt, "malformed")


def test_only_pytorch_bin(ckpt: Path) -> None:
    state = load_file(str(ckpt / WEIGHTS))
    (ckpt / WEIGHTS).unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    load_fails(ckpt, "no *.safetensors", "convert")
    with pytest.raises(WorkbenchError):
        read_state_dict(ckpt)


def test_errors_are_not_chained_tracebacks(ckpt: Path) -> None:
    """WorkbenchErrors raised while handling another error hide it (``from None``)."""
    (ckpt / WEIGHTS).write_bytes(b"\0" * 3)
    err = load_fails(ckpt)
    assert err.__suppress_context__


# --------------------------------------------------------------------------- both RoPE spellings

BASE = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096)
SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192)


@pytest.mark.parametrize("new, old", [
    # transformers 5: everything in rope_parameters    vs  4.x: rope_theta + rope_scaling
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
     {"rope_theta": 5e5, "rope_scaling": None}),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
     {"rope_theta": 5e5}),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **SCALING}},
     {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **SCALING}}),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **SCALING}},
     {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **SCALING}}),  # oldest spelling
], ids=["default", "default-no-scaling-key", "llama3", "llama3-type-key"])
def test_rope_spellings_parse_the_same(new: dict, old: dict) -> None:
    a = ModelConfig.from_hf_dict(BASE | new)
    b = ModelConfig.from_hf_dict(BASE | old)
    assert a == b
    assert a.rope_theta == 5e5
    if "llama3" in json.dumps(new):
        assert a.rope_scaling == RopeScaling(**SCALING)
    else:
        assert a.rope_scaling is None


def test_rope_defaults() -> None:
    c = ModelConfig.from_hf_dict(dict(BASE))
    assert (c.rope_theta, c.rope_scaling) == (10000.0, None)
    assert c.head_dim == 16 and c.eos_token_ids == ()


@pytest.mark.parametrize("config", [
    tiny_config(),
    tiny_config(rope_theta=5e5, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
                tie_word_embeddings=True, eos_token_ids=(1, 2), pad_token_id=None),
    tiny_config(model_type="qwen2", qkv_bias=True, rope_theta=1e6),
    tiny_config(qkv_bias=True, o_bias=True, mlp_bias=True, head_dim=16, bos_token_id=3),
], ids=["plain", "llama3-tied-2eos", "qwen2", "llama-biases"])
def test_to_hf_dict_round_trip(config: ModelConfig, tmp_path: Path) -> None:
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_hf_dict()))
    assert ModelConfig.from_file(path) == config


def test_transformers_configs_parse_the_same() -> None:
    """LlamaConfig built from old-style kwargs serialises (5.x) to what we read as the same."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "model_type"}, head_dim=16, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", **SCALING}, eos_token_id=[1, 2])
    ours = ModelConfig.from_hf_dict(hf.to_dict())
    assert ours == ModelConfig.from_hf_dict(
        BASE | {"head_dim": 16, "rope_theta": 5e5, "eos_token_id": [1, 2], "bos_token_id": 1,
                "rope_scaling": {"rope_type": "llama3", **SCALING}, "rms_norm_eps": 1e-6})
    assert ours.rope_scaling == RopeScaling(**SCALING)
