"""Each rank reads only its own shard of the checkpoint (safetensors slices, never the whole file).

:func:`tp_slice` says which part of a checkpoint tensor a tensor-parallel rank holds: rows
``[tp_rank * n, (tp_rank + 1) * n)`` of a column-parallel weight (q/k/v, gate/up: its ``n = out/tp``
output features, hence ``H/tp`` query heads and ``Hkv/tp`` KV heads, GQA groups whole) and of its
bias; the same columns of a row-parallel weight (o_proj, down_proj; their bias is added once, so
whole); everything else (norms, embedding, LM head) whole. With vocabulary parallelism the
embedding and LM head rows come from :func:`~workbench.parallel.tensor.vocab_range`. The rank reads
just those bytes with ``safe_open(...).get_slice``. A pipeline stage's model has no parameters for
other stages' layers, so it reads none of them either. Notebook 04 counts the bytes; lab 04
(``labs/solutions/lab04_tensor_parallel.ipynb``) has the student write :func:`tp_slice`.
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
from workbench.parallel.tensor import vocab_range
from workbench.plug import pluggable

__all__ = ["load_shard", "random_shard", "tp_slice"]


def _full_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: p.shape for name, p in LlamaModel(config).named_parameters()}


COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")


@pluggable("tp.slice")
def tp_slice(name: str, shape: tuple[int, ...], tp: int,
             tp_rank: int) -> tuple[int, int, int] | None:
    """(dim, start, end): rank ``tp_rank`` of ``tp`` holds indices ``[start, end)`` along ``dim`` of
    checkpoint tensor ``name`` (full ``shape``); None when every rank holds it whole.

    Column-parallel layers (``COLUMN_PARALLEL``: weight ``[out, in]`` and bias ``[out]``) split
    dim 0, row-parallel ones (``ROW_PARALLEL``) split the weight's dim 1 (``in``):
    ``n = shape[dim] / tp`` each, rank r taking ``[r * n, (r + 1) * n)``.
    """
    module, _, kind = name.rpartition(".")  # "layers.0.self_attn.q_proj", "weight"
    layer = module.rpartition(".")[2]
    if layer in COLUMN_PARALLEL:
        dim = 0
    elif layer in ROW_PARALLEL and kind == "weight":
        dim = 1
    else:
        return None
    if shape[dim] % tp:
        raise WorkbenchError(f"tensor {name}: dimension {dim} ({shape[dim]}) does not split "
                             f"{tp} ways")
    n = shape[dim] // tp
    return dim, tp_rank * n, (tp_rank + 1) * n


def _cut(name: str, local: torch.Size, full: torch.Size, mesh: Mesh) -> tuple[int, int, int] | None:
    """This rank's slice of ``name``, checked against the shape the rank's model holds."""
    if name in VOCAB_TENSORS and local[0] != full[0]:  # vocabulary-parallel: padded equal shards
        start, end = vocab_range(full[0], mesh.tp, mesh.tp_rank)
        cut = (0, start, end)
        fits = end - start <= local[0] and tuple(local[1:]) == tuple(full[1:])
    else:
        cut = tp_slice(name, tuple(full), mesh.tp, mesh.tp_rank) if mesh.tp > 1 else None
        shape = list(full)
        if cut is not None:
            shape[cut[0]] = cut[2] - cut[1]
        fits = tuple(shape) == tuple(local)
    if not fits or (cut is not None and not 0 <= cut[1] <= cut[2] <= full[cut[0]]):
        raise WorkbenchError(f"tensor {name}: slice {cut} of shape {tuple(full)} does not fit "
                             f"the {tuple(local)} that rank {mesh.tp_rank} of tp={mesh.tp} holds")
    return cut


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
            cut = _cut(name, param.shape, full[source], mesh)
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
