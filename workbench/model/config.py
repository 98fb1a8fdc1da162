"""The shape of a Llama-family model, read from a Hugging Face ``config.json``.

One frozen dataclass describes every model the workbench runs: Llama 2/3 (with or without the
"llama3" RoPE frequency scaling) and Qwen2 (the same block with biases on the q/k/v projections).
Both the old (``rope_theta`` + ``rope_scaling``) and the transformers-5 (``rope_parameters``) ways of
writing the rotary settings are understood.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (``rope_type == "llama3"``).

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` are kept,
    longer than ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, and
    the band between is interpolated smoothly.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only Llama-family transformer."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 style, or Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise WorkbenchError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise WorkbenchError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise WorkbenchError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def gqa_group(self) -> int:
        """Query heads that share one key/value head (1 = multi-head, H = multi-query)."""
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        """Parameters stored in the checkpoint (the tied LM head counted once)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """KV-cache bytes one token occupies over all layers: 2 (K and V) x layers x kv heads x d."""
        return (2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
                * bytes_per_element)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers (4.x and 5.x) reads back as the same model."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    **dataclasses.asdict(self.rope_scaling)}
        eos = list(self.eos_token_ids)
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else rope,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config dict; unsupported architectures raise WorkbenchError."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = raw.get("architectures") or "?"
            raise WorkbenchError(
                f"unsupported model_type {model_type!r} (architectures {arch}): the workbench runs "
                f"the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)})")
        if raw.get("hidden_act", "silu") != "silu":
            raise WorkbenchError(f"unsupported hidden_act {raw['hidden_act']!r}: expected 'silu'")
        if raw.get("use_sliding_window"):
            raise WorkbenchError("sliding-window attention in Qwen2 checkpoints is not supported")
        try:
            heads = _integer(raw, "num_attention_heads")
            hidden = _integer(raw, "hidden_size")
            if heads <= 0:
                raise WorkbenchError(f"model config: num_attention_heads must be a positive "
                                     f"integer, got {heads}")
            rope_theta, scaling = _read_rope(raw)
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            qkv_bias = model_type == "qwen2" or bool(raw.get("attention_bias", False))
            return cls(
                vocab_size=_integer(raw, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_integer(raw, "intermediate_size"),
                num_hidden_layers=_integer(raw, "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=_integer(raw, "num_key_value_heads", heads),
                head_dim=_integer(raw, "head_dim", hidden // heads),
                max_position_embeddings=_integer(raw, "max_position_embeddings", 2048),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=model_type == "llama" and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                model_type=model_type,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                pad_token_id=raw.get("pad_token_id"),
            )
        except KeyError as err:
            raise WorkbenchError(f"model config is missing the key {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise WorkbenchError(f"model config has a malformed value: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise WorkbenchError(f"no config.json in {path.parent}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WorkbenchError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise WorkbenchError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(raw)


def _integer(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    """``raw[key]`` as an int; a missing/null key takes ``default``; 10.7 or "8" is an error."""
    if key not in raw and default is None:
        raise KeyError(key)
    value = raw.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise WorkbenchError(f"model config has a malformed value: {key} must be an integer, "
                             f"got {value!r}")
    return int(value)


def _read_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise WorkbenchError(f"model config: rope_parameters/rope_scaling must be an object, "
                             f"got {params!r}")
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise WorkbenchError(f"unsupported RoPE type {rope_type!r}: expected 'default' or 'llama3'")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
