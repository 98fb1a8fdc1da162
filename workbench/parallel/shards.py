"""Each rank reads only its own shard of the checkpoint (safetensors slices, never the whole file).

A parameter of the rank's model either has the full checkpoint shape (norms, biases of
row-parallel layers, an unsplit embedding) and is read whole, or differs from it in exactly one
dimension, the split one: the rank reads rows (column-parallel, vocabulary-parallel) or columns
(row-parallel) ``[tp_rank * n, (tp_rank + 1) * n)`` of it with ``safe_open(...).get_slice``, which
reads just those bytes. A pipeline stage's model has no parameters for other stages' layers, so
it reads none of them either. Notebook 04 counts the bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.model.llama import LlamaModel
from workbench.model.loading import safetensors_files
from workbench.parallel.plan import Mesh

__all__ = ["load_shard", "random_shard"]


def _full_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: p.shape for name, p in LlamaModel(config).named_parameters()}


def _split(name: str, local: torch.Size, full: torch.Size, mesh: Mesh) -> tuple[int, int, int] | None:
    """(dim, start, end) of this rank's slice, or None when it holds the tensor whole."""
    if local == full:
        return None
    dims = [d for d in range(len(full)) if local[d] != full[d]]
    if len(dims) != 1 or len(local) != len(full):
        raise WorkbenchError(f"tensor {name}: shard shape {tuple(local)} does not split the "
                             f"checkpoint shape {tuple(full)} along one dimension")
    d = dims[0]
    start = mesh.tp_rank * local[d]
    return d, min(start, full[d]), min(start + local[d], full[d])


def _checkpoint_index(model_dir: Path) -> dict[str, tuple[Path, str]]:
    """Tensor name (``model.`` prefix removed) -> (file, name in the file); reads headers only."""
    index = {}
    for file in safetensors_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    index[key.removeprefix("model.")] = (file, key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise WorkbenchError(f"cannot read {file}: {str(err).splitlines()[0]}") from None
    return index


@torch.no_grad()
def load_shard(model: LlamaModel, model_dir: Path, config: ModelConfig, mesh: Mesh) -> int:
    """Fill ``model`` (from :func:`~workbench.parallel.tensor.build_rank_model`) with this rank's
    slices of the checkpoint in ``model_dir``; return the bytes read."""
    full = _full_shapes(config)
    index = _checkpoint_index(model_dir)
    nbytes, handles = 0, {}
    try:
        for name, param in model.named_parameters():
            source = name
            if name == "lm_head.weight" and config.tie_word_embeddings:
                source = "embed_tokens.weight"  # the head is the embedding matrix
            if source not in index:
                raise WorkbenchError(f"checkpoint {model_dir} lacks tensor {source}")
            file, key = index[source]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            piece = handles[file].get_slice(key)
            if tuple(piece.get_shape()) != tuple(full[source]):
                raise WorkbenchError(f"tensor {source} has shape {tuple(piece.get_shape())}, "
                                     f"config implies {tuple(full[source])}")
            cut = _split(name, param.shape, full[source], mesh)
            if cut is None:
                value = piece[:]
            else:
                d, start, end = cut
                value = piece[start:end] if d == 0 else piece[:, start:end]
                param.zero_()  # a padded vocabulary shard keeps zeros past the vocabulary
            param[tuple(slice(0, s) for s in value.shape)].copy_(value)
            nbytes += value.numel() * value.element_size()
    except (SafetensorError, OSError) as err:
        raise WorkbenchError(f"cannot read {model_dir}: {str(err).splitlines()[0]}") from None
    finally:
        handles.clear()
    return nbytes


def random_shard(model: LlamaModel, seed: int = 0, std: float = 0.02) -> None:
    """N(0, std) weights for a shape preset's shard (timing only): norms 1, biases 0."""
    from workbench.model.presets import fill_random

    fill_random(model, seed, std)
