"""Flash-aware loading of the FFN ("LLM in a flash", Alizadeh et al., Apple, 2023).

When the weights live on flash/disk and RAM holds only part of them, a token need not read the whole
FFN: most neurons contribute little. Three ideas, each measured here on held-out text:

1. **predict** the active neurons of a token before computing them. Our FFN is SwiGLU,
   ``a = silu(x Wg^T) * (x Wu^T)``, ``y = a Wd^T``, which is not ReLU-sparse, so "active" means the
   top-``k`` of ``|a|``. The predictor is low-rank: ``Wg ~ Ug Sg Vg^T`` and ``Wu`` likewise (SVD,
   rank ``r``), scores ``|silu(x Wg_r^T) * (x Wu_r^T)|`` at ``2 r (h + I)`` MACs instead of ``2 h I``.
2. a **sliding window**: keep in RAM the neurons active for any of the last ``w`` tokens; a token
   loads only its active neurons that are not there yet.
3. **row-column bundling**: store neuron ``i``'s gate row, up row and down column side by side
   (``[I, 3, h]``), so loading a neuron is one contiguous read of ``3 h`` values, not three reads
   from three matrices (one of them a strided column).

:func:`io_per_token` replays a token sequence and counts/performs the reads of each strategy
against dense loading of the whole FFN. Notebook ``06_offloading``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel
from workbench.model.rope import rope_cos_sin
from workbench.offload.store import DiskFile


@torch.inference_mode()
def mlp_inputs(model: LlamaModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """The FFN input of every layer (post-attention-norm hidden states) for ``ids [1, T]``."""
    batch = ForwardBatch.prefill(ids)
    x = model.embed(batch)
    cos, sin = rope_cos_sin(model.inv_freq, batch.positions, x.dtype)
    out = []
    for layer in model.layers:
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, batch, None)
        m = layer.post_attention_layernorm(x)  # [1, T, hidden]
        out.append(m[0])
        x = x + layer.mlp(m)
    return out


class LowRankPredictor(nn.Module):
    """Scores ``|silu(x Wg_r^T) * (x Wu_r^T)|`` with rank-``r`` SVD factors of gate and up."""

    @torch.no_grad()
    def __init__(self, mlp: nn.Module, rank: int) -> None:
        super().__init__()
        factors = []
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):  # [I, h]
            U, S, Vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
            factors += [Vh[:rank].T.contiguous(), (U[:, :rank] * S[:rank]).T.contiguous()]
        self.gv, self.gu, self.uv, self.uu = factors  # [h, r], [r, I], [h, r], [r, I]
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (F.silu(x @ self.gv @ self.gu) * (x @ self.uv @ self.uu)).abs()  # [..., I]


@torch.inference_mode()
def true_scores(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``|a|``, the magnitude of each neuron's contribution weight: ``[..., I]``."""
    return (F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().float()


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[..., I]``, True for the ``k`` largest scores of each row."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def recall(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of the truly active neurons that the prediction also selects."""
    return (predicted & truth).sum().item() / max(1, truth.sum().item())


class SparseMLP(nn.Module):
    """The SwiGLU FFN computed on the ``density`` share of neurons a selector picks per token
    (the rest contribute zero): what a flash-loaded FFN computes."""

    def __init__(self, mlp: nn.Module, density: float, predictor: nn.Module | None) -> None:
        super().__init__()
        self.mlp, self.predictor = mlp, predictor
        self.k = max(1, round(density * mlp.gate_proj.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)  # [B, T, I]
        scores = self.predictor(x) if self.predictor is not None else a.abs()
        return self.mlp.down_proj(a * top_k_mask(scores, self.k).to(a.dtype))


def sparse_model(model: LlamaModel, density: float, rank: int | None) -> LlamaModel:
    """A copy of ``model`` whose FFNs keep ``density`` of their neurons per token, chosen by the
    rank-``rank`` predictor (``None``: the true top-k, an oracle)."""
    out = copy.deepcopy(model)
    for layer in out.layers:
        predictor = LowRankPredictor(layer.mlp, rank) if rank is not None else None
        layer.mlp = SparseMLP(layer.mlp, density, predictor)
    return out


@dataclass(frozen=True)
class ReadPlan:
    """What loading the FFN weights of one layer for a sequence of tokens costs."""

    strategy: str
    bytes_per_token: float
    reads_per_token: float
    seconds_per_token: float | None = None


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted neuron indices -> maximal runs of consecutive ones, as (first, count)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def window_loads(active: torch.Tensor, window: int) -> list[list[int]]:
    """Per token, the active neurons (``active [T, I]`` bool) not held by the sliding window of the
    previous ``window`` tokens' active sets: what must be read for that token."""
    loads, recent = [], []
    for t in range(active.shape[0]):
        held = set().union(*recent) if recent else set()
        now = set(torch.nonzero(active[t]).flatten().tolist())
        loads.append(sorted(now - held))
        recent = (recent + [now])[-window:] if window > 0 else []
    return loads


def io_per_token(mlp: nn.Module, active: torch.Tensor, window: int, folder: str | Path,
                 timed: bool = True) -> list[ReadPlan]:
    """Replay ``active [T, I]`` for one layer: bytes, reads and (cold) time per token of dense
    loading, of sparse loading from three separate matrices, and of sparse bundled loading."""
    gate, up, down = (mlp.gate_proj.weight.detach().cpu(), mlp.up_proj.weight.detach().cpu(),
                      mlp.down_proj.weight.detach().cpu())
    I, h = gate.shape
    row = h * gate.element_size()  # bytes of one neuron's row in one matrix
    bundled = torch.stack([gate, up, down.T], dim=1).contiguous()  # [I, 3, h]: neuron i contiguous
    separate = torch.cat([gate, up, down.T.contiguous()]).contiguous()  # [3I, h]: gate | up | down^T
    folder = Path(folder)
    files = {"bundled": DiskFile(folder / "ffn-bundled.bin", bundled, cold=True),
             "separate": DiskFile(folder / "ffn-separate.bin", separate, cold=True)}
    loads = window_loads(active, window)
    T = len(loads)
    plans = []
    try:
        for strategy in ("dense", "separate", "bundled"):
            reads, nbytes, spans = [], 0, []
            for neurons in loads:
                runs = _runs(neurons)
                if strategy == "dense":
                    spans.append([(0, 3 * I * row)])
                elif strategy == "bundled":
                    spans.append([(i * 3 * row, n * 3 * row) for i, n in runs])
                else:  # the same runs in each of the three matrices
                    spans.append([(m * I * row + i * row, n * row) for m in range(3) for i, n in runs])
                reads.append(len(spans[-1]))
                nbytes += sum(n for _, n in spans[-1])
            seconds = _replay(files["separate" if strategy != "bundled" else "bundled"], spans) \
                if timed else None
            plans.append(ReadPlan(strategy, nbytes / T, sum(reads) / T,
                                  None if seconds is None else seconds / T))
    finally:
        for f in files.values():
            f.close()
            f.path.unlink(missing_ok=True)
    return plans


def _replay(file: DiskFile, spans: list[list[tuple[int, int]]]) -> float:
    """Perform the reads (cold: the file is evicted before each token); total seconds."""
    biggest = max((n for token in spans for _, n in token), default=0)
    buf = torch.empty(biggest, dtype=torch.uint8)
    total = 0.0
    for token in spans:
        file.evict()
        t0 = time.perf_counter()
        for offset, n in token:
            buf[:n].copy_(file.flat[offset:offset + n])
        total += time.perf_counter() - t0
    return total
