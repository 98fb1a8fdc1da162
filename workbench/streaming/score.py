"""Score one long stream four ways, as StreamingLLM's paper compares them (notebook 08).

Each method predicts every next token of the stream with at most ``window`` keys per query
(dense excepted), and we record the loss at every position and the time per token:

* ``dense``: the whole history in a growing KV cache, at its stream positions. It costs more per
  token as the stream grows and fails past the trained context (unseen positions);
* ``window``: window attention, the last ``window`` tokens' cached KV (:class:`SinkKVCache` with
  no sinks). Cheap, but once the first tokens are evicted it loses the attention sinks;
* ``recompute``: sliding window with recomputation: for each token, a fresh forward pass over
  the last ``window`` tokens (positions 0..window-1). Good perplexity, ``window`` times the work;
* ``sinks``: StreamingLLM, ``sinks`` first tokens + the last ``window - sinks`` (same budget).

Scoring goes token by token (``chunk = 1``, the streaming computation itself) or ``chunk`` tokens
per forward pass, which gives the same losses (the caches' chunk paths are exact) much faster on a
CPU. Recomputation can be evaluated at every ``recompute_every``-th position only: its perplexity
is then an estimate on those positions, and comparisons use the same positions.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from workbench.attention.masks import causal_mask
from workbench.errors import WorkbenchError
from workbench.kv.contiguous import ContiguousKVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel
from workbench.streaming.cache import SinkKVCache, StreamingConfig

METHODS = ("dense", "window", "recompute", "sinks")
LABELS = {"dense": "dense attention", "window": "window attention (no sinks)",
          "recompute": "sliding window + recomputation", "sinks": "attention sinks + window"}


@dataclass(frozen=True)
class StreamEval:
    """How to score a stream: the KV budget ``window`` (keys a query sees), ``sinks`` of it kept
    for StreamingLLM, tokens per forward pass, recomputation subsampling, dense cut-off."""

    window: int = 1024
    sinks: int = 4
    chunk: int = 1
    recompute_every: int = 1
    dense_max_tokens: int | None = None  # None: dense scores the whole stream

    def __post_init__(self) -> None:
        for name in ("window", "chunk", "recompute_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkbenchError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise WorkbenchError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        if self.sinks >= self.window:
            raise WorkbenchError(f"sinks ({self.sinks}) must be smaller than the window "
                                 f"({self.window}): the window keeps sinks + recent tokens")
        if self.dense_max_tokens is not None and self.dense_max_tokens < 2:
            raise WorkbenchError(f"dense_max_tokens must be >= 2, got {self.dense_max_tokens}")

    def streaming(self, method: str) -> StreamingConfig:
        """The rolling cache of ``window`` (no sinks) or ``sinks`` (same budget of keys)."""
        sinks = self.sinks if method == "sinks" else 0
        return StreamingConfig(sinks=sinks, window=self.window - sinks)


@dataclass
class StreamScore:
    """Per-position losses of one method: ``nll[t] = -log p(ids[t + 1] | ids[..t])`` (NaN where
    not evaluated), and what the pass cost."""

    method: str
    nll: torch.Tensor  # [N - 1] float32 on the CPU
    seconds: float  # wall time of the scoring pass
    forward_tokens: int  # tokens pushed through the model (recomputation: window per position)
    kv_tokens: int  # most keys one query attended to

    @property
    def evaluated(self) -> torch.Tensor:
        return ~self.nll.isnan()

    def ppl(self, start: int = 0, end: int | None = None,
            where: torch.Tensor | None = None) -> float:
        """Perplexity ``exp(mean nll)`` over evaluated positions in [start, end) (and ``where``)."""
        keep = self.evaluated.clone()
        keep[:start] = False
        if end is not None:
            keep[end:] = False
        if where is not None:
            keep &= where
        if not keep.any():
            return float("nan")
        return math.exp(self.nll[keep].double().mean().item())

    def ppl_by_bin(self, bin_size: int,
                   where: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
        """(bin start positions, perplexity of each bin) over the stream (``where`` only)."""
        starts = list(range(0, len(self.nll), bin_size))
        return starts, [self.ppl(s, s + bin_size, where) for s in starts]


def long_stream(tokenizer, num_tokens: int, vocab_size: int | None = None,
                seed: int = 0) -> torch.Tensor:
    """``num_tokens`` ids [N] of held-out standard-library code, documents concatenated with
    ``<|endoftext|>`` between them; seeded random ids when there is no tokenizer (presets)."""
    if num_tokens < 2:
        raise WorkbenchError(f"a stream needs at least 2 tokens, got {num_tokens}")
    if tokenizer is None:
        if vocab_size is None:
            raise WorkbenchError("long_stream: without a tokenizer, give vocab_size")
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(1, vocab_size, (num_tokens,), generator=gen)
    from workbench.training.prompts import load_heldout_text

    text = load_heldout_text()
    chars = 6 * num_tokens  # about 3.9 characters per token in this corpus
    while True:
        ids = tokenizer(text[:chars], verbose=False)["input_ids"]
        if len(ids) > num_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < num_tokens:
        raise WorkbenchError(f"the held-out text has only {len(ids)} tokens, {num_tokens} asked")
    return torch.tensor(ids[:num_tokens])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [T, V], targets [T] -> -log p(target) [T] in float32."""
    logp = logits.float().log_softmax(dim=-1)
    return -logp.gather(-1, targets[:, None])[:, 0]


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


@torch.inference_mode()
def score_stream(model: LlamaModel, ids: torch.Tensor, method: str, spec: StreamEval,
                 progress: bool = False) -> StreamScore:
    """Score stream ``ids`` [N] with ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    context = model.config.max_position_embeddings
    if method != "dense" and spec.window > context:
        raise WorkbenchError(f"window {spec.window} exceeds the model's context of {context}")
    dev = model.device
    ids = ids.to(dev)
    n = len(ids) if method != "dense" else min(len(ids), spec.dense_max_tokens or len(ids))
    nll = torch.full((len(ids) - 1,), float("nan"), device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    if method == "recompute":
        forward_tokens = _score_recompute(model, ids, spec, nll, progress)
        kv_tokens = min(spec.window, len(ids))
    else:
        if method == "dense":
            cache = ContiguousKVCache(model.config, 1, n, dev, model.dtype)
            kv_tokens = n
        else:
            cache = SinkKVCache(model.config, spec.streaming(method), 1, dev, model.dtype)
            kv_tokens = min(cache.capacity, n)
        with _bar(n, LABELS[method], progress) as bar:
            for start in range(0, n, spec.chunk):
                end = min(start + spec.chunk, n)
                x = ids[None, start:end]  # [1, T]
                batch = (cache.next_batch(x) if method != "dense" else ForwardBatch(
                    x, torch.arange(start, end, device=dev)[None], kv_start=start,
                    mask=None if start == 0 or end - start == 1
                    else causal_mask(end - start, end, dev)[None, None]))
                logits = model(batch, cache)[0]  # [T, V]
                last = min(end, len(ids) - 1)  # the stream's last token has nothing to predict
                nll[start:last] = _nll(logits[:last - start], ids[start + 1:last + 1])
                bar.update(end - start)
        forward_tokens = n
    _sync(dev)
    return StreamScore(method, nll.cpu(), time.perf_counter() - t0, forward_tokens, kv_tokens)


VISIBLY_WORSE = 1.10  # window without sinks over sinks + window: the bar's "degrades visibly"


def window_over_sinks(window_only: StreamScore, with_sinks: StreamScore, window: int) -> float:
    """Perplexity of window attention without sinks over sinks + window on the positions from
    ``window`` on, where the first tokens have been evicted (before, the two caches are equal)."""
    return window_only.ppl(window) / with_sinks.ppl(window)


def eviction_penalty(model: LlamaModel, ids: torch.Tensor, windows: list[int], sinks: int = 4,
                     chunk: int = 128) -> dict[int, float]:
    """How much ``model`` needs its first tokens: for each window size, the perplexity of window
    attention without sinks over that of ``sinks`` + window, on the positions after the window
    first filled (the first eviction). About 1: evicting the first tokens costs nothing; above 1:
    the model relies on them (StreamingLLM's attention sinks)."""
    too_long = [w for w in windows if w >= len(ids) - 1]
    if too_long:
        raise WorkbenchError(f"windows {too_long} leave no position after the first eviction in a "
                             f"stream of {len(ids)} tokens")
    penalty = {}
    for window in windows:
        spec = StreamEval(window=window, sinks=sinks, chunk=min(chunk, window))
        window_only, with_sinks = (score_stream(model, ids, m, spec) for m in ("window", "sinks"))
        penalty[window] = window_over_sinks(window_only, with_sinks, window)
    return penalty


def _score_recompute(model: LlamaModel, ids: torch.Tensor, spec: StreamEval, nll: torch.Tensor,
                     progress: bool) -> int:
    """Each evaluated position t: one forward pass over ids[t - window + 1 .. t]."""
    W, forward_tokens = spec.window, 0
    positions = range(spec.recompute_every - 1, len(ids) - 1, spec.recompute_every)
    with _bar(len(positions), LABELS["recompute"], progress) as bar:
        for t in positions:
            x = ids[None, max(0, t - W + 1):t + 1]  # [1, <= W]
            logits = model(ForwardBatch.prefill(x), last_only=True)  # [1, V]
            nll[t:t + 1] = _nll(logits, ids[t + 1:t + 2])
            forward_tokens += x.shape[1]
            bar.update()
    return forward_tokens


@torch.inference_mode()
def time_per_token(model: LlamaModel, ids: torch.Tensor, method: str, spec: StreamEval,
                   steps: int = 16, warmup: int = 2, cuda_graphs: bool = False) -> float:
    """Seconds per new token in steady state: the rolling caches full, dense at ``len(ids)``
    tokens of history, recomputation over full windows. One decode step per token (one
    ``window``-token forward pass for recomputation); the median of ``steps`` timed steps, each
    waited for (as a generator must, to hand the token out). ``cuda_graphs`` (GPU; the rolling
    caches): each step is the replay of one captured decode step (:meth:`SinkKVCache.graph_mode`)."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    dev, W, n = model.device, spec.window, len(ids)
    need = (n if method == "dense" else W) + warmup + steps
    if n < need and method != "dense":
        raise WorkbenchError(f"timing {method} needs a stream of {need} tokens, got {n}")
    if method == "dense" and n < warmup + steps + 2:
        raise WorkbenchError(f"timing dense needs more than {warmup + steps + 1} tokens, got {n}")
    ids = ids.to(dev)
    if method == "recompute":
        def step(i: int) -> None:
            model(ForwardBatch.prefill(ids[None, i:i + W]), last_only=True)
    else:
        prefix = n - warmup - steps if method == "dense" else W
        if method == "dense":
            cache = ContiguousKVCache(model.config, 1, n, dev, model.dtype)
            for s in range(0, prefix, 512):  # prefill in chunks, not timed
                e = min(s + 512, prefix)
                mask = None if s == 0 else causal_mask(e - s, e, dev)[None, None]
                model(ForwardBatch(ids[None, s:e], torch.arange(s, e, device=dev)[None],
                                   mask=mask, kv_start=s), cache, last_only=True)
        else:
            cache = SinkKVCache(model.config, spec.streaming(method), 1, dev, model.dtype)
            model(cache.next_batch(ids[None, :prefix]), cache, last_only=True)

        def eager_step(i: int) -> None:
            p = prefix + i
            x = ids[None, p:p + 1]
            batch = (cache.next_batch(x) if method != "dense"
                     else ForwardBatch(x, torch.arange(p, p + 1, device=dev)[None], kv_start=p))
            model(batch, cache, last_only=True)
        step = (_graph_decode(model, cache, ids, prefix)
                if cuda_graphs and method in ("window", "sinks") and dev.type == "cuda"
                else eager_step)
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):  # median of single steps: robust to a busy machine
        _sync(dev)
        t0 = time.perf_counter()
        step(i)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _graph_decode(model: LlamaModel, cache, ids: torch.Tensor, prefix: int):
    """A step function replaying one captured decode step of the full rolling ``cache``: token
    ``prefix + i`` is copied into the graph's input, the graph writes its keys/values, attends and
    advances the cache's device count (the Python count follows)."""
    from workbench.engine.cudagraph import capture_graph

    cache.graph_mode()
    x = ids[None, prefix:prefix + 1].clone()  # [1, 1] the graph's input
    batch = cache.next_batch(x)  # positions: capacity - 1 from now on
    # the 2 warm-up calls are real steps of the stream; logits [1, vocab] rewritten by each replay
    graph, logits = capture_graph(lambda: model(batch, cache, last_only=True), warmup=2)
    cache.seen -= 1  # capture ran no kernel: the device count did not move, the Python one did

    def step(i: int) -> None:
        x.copy_(ids[None, prefix + i:prefix + i + 1])
        graph.replay()
        cache.seen += 1

    step.logits = logits  # the stream it scored: ids[:prefix], ids[prefix] twice, then each step's
    return step
