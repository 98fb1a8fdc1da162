"""Load a local Hugging Face checkpoint directory into our model, without pickle.

A checkpoint directory holds ``config.json``, the weights as ``model.safetensors`` (or shards listed
in ``model.safetensors.index.json``), and usually ``tokenizer.json``. Weights are matched by name; a
missing, unexpected or misshapen tensor is an error, never silently skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.model.llama import LlamaModel, empty_model

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
BUNDLED_MODEL = "stdlib-llama-7m"
# Names for the models in data/models: the project's model, and the same shape trained longer on more
# code, which grew attention sinks (notebook 08; data/models/stdlib-llama-7m-sinks/README.md).
BUNDLED_MODELS = {"bundled": BUNDLED_MODEL, "bundled-sinks": "stdlib-llama-7m-sinks"}
PRESET_PREFIX = "preset:"


def resolve_model_dir(model: str | Path) -> Path:
    """``"bundled"`` -> the project's own model, ``"bundled-sinks"`` -> the same shape with attention
    sinks (:data:`BUNDLED_MODELS`); anything else is a checkpoint directory."""
    name = BUNDLED_MODELS.get(str(model))
    path = DATA_DIR / "models" / name if name else Path(model)
    if not path.is_dir():
        raise WorkbenchError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise WorkbenchError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: the index's shards, or every ``*.safetensors`` file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise WorkbenchError(f"{index} is malformed: {err}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WorkbenchError(f"{index.name} names shards that are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WorkbenchError(f"no *.safetensors weights in {model_dir} (pickled .bin files are "
                             "not loaded: convert them to safetensors)")
    return files


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by name, with the ``model.`` prefix of HF names removed."""
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensors[name.removeprefix("model.")] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise WorkbenchError(f"cannot read {file} (corrupt or truncated safetensors?): "
                                 f"{str(err).splitlines()[0]}") from None
    return tensors


def load_model(model: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> LlamaModel:
    """Build :class:`LlamaModel` from a checkpoint directory (or ``"bundled"``) on ``device``.

    ``"preset:NAME"`` gives a random-weight model of a real model's shape (for timing).
    """
    if str(model).startswith(PRESET_PREFIX):
        from workbench.model.presets import random_model

        return random_model(str(model).removeprefix(PRESET_PREFIX), device, dtype)
    model_dir = resolve_model_dir(model)
    config = ModelConfig.from_file(model_dir / "config.json")
    state = read_state_dict(model_dir)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the head is the embedding matrix
    with torch.device("meta"):
        expected = {name: p.shape for name, p in LlamaModel(config).named_parameters()}
    # named_parameters lists a tied weight once, under embed_tokens
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WorkbenchError(f"checkpoint {model_dir} does not match its config: missing "
                             f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                             f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise WorkbenchError(f"tensor {name} has shape {tuple(state[name].shape)}, "
                                 f"config implies {tuple(shape)}")
    net = empty_model(config, device, dtype)
    net.load_state_dict(state, strict=False)  # strictness checked above, by name and shape
    return net.eval()


def load_tokenizer(model: str | Path):
    """The checkpoint's tokenizer through ``transformers.AutoTokenizer``, or None if it has none."""
    if str(model).startswith(PRESET_PREFIX):
        return None  # shape presets are random weights: token ids only
    model_dir = resolve_model_dir(model)
    if not (model_dir / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer  # heavy import, only when needed

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # noqa: BLE001 - any failure here is a broken checkpoint for the user
        raise WorkbenchError(f"cannot load the tokenizer of {model_dir}: {err}") from None


def save_checkpoint(model: LlamaModel, out_dir: str | Path,
                    dtype: torch.dtype = torch.bfloat16) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` (HF names)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {f"model.{name}": p.detach().to("cpu", dtype).contiguous()
             for name, p in model.named_parameters() if name != "lm_head.weight"}
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.detach().to("cpu", dtype).contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    eos = list(config.eos_token_ids)
    generation = {"eos_token_id": eos[0] if len(eos) == 1 else eos,
                  "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
