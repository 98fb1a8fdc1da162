"""Request traces for benchmarks and notebooks: prompt and output lengths, arrival times.

A :class:`WorkloadSpec` is a recipe; :func:`make_requests` turns it into the same
:class:`~workbench.engine.requests.Request` objects for the same seed. Three knobs decide how much
batching can help (notebook ``02_batching``):

* **prompts** - ``None``: the held-out signature+docstring prompts as they are; a length
  distribution: windows of exactly that many tokens of held-out standard-library code (real code
  the bundled model never saw), or random ids when there is no tokenizer (random-weight presets).
* **outputs** - ``None``: stop on EOS (cap ``max_new_tokens``); a distribution: each request
  generates exactly its drawn length (``ignore_eos``, as in vLLM's benchmarks).
* **arrivals** - ``"burst"`` (all at t=0) or ``"poisson"`` at ``rate`` requests/s: the first at
  t=0, then gaps ``t_{i+1} - t_i ~ Exp(mean 1/rate)``.

Presets: :data:`WORKLOADS` through :func:`workload`, and :func:`anyscale` for its cap sweep.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from workbench.engine.requests import Request
from workbench.errors import WorkbenchError

ARRIVALS = ("burst", "poisson")
ANYSCALE_PROMPT = 512  # the Anyscale benchmark's prompt length (tokens)
ANYSCALE_MEAN = 128  # mean of its exponential output lengths (tokens)
ANYSCALE_CAPS = (32, 128, 512, 1536)  # the output caps it sweeps
_WINDOW_SLACK = 32  # extra tokens gathered so a code window can slide off a bad last token


def _check_int(what: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise WorkbenchError(f"{what} must be an integer >= {lo}, got {value!r}")


def _check_positive(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise WorkbenchError(f"{what} must be a number > 0, got {value!r}")


@dataclass(frozen=True)
class Fixed:
    """Every request gets exactly ``n`` tokens."""

    n: int

    def __post_init__(self) -> None:
        _check_int("Fixed.n", self.n, 1)

    def expected(self) -> float:
        return float(self.n)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.n, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    """Lengths drawn uniformly from the integers ``lo..hi`` (both included)."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        _check_int("Uniform.lo", self.lo, 1)
        _check_int("Uniform.hi", self.hi, self.lo)

    def expected(self) -> float:
        return (self.lo + self.hi) / 2

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.lo, self.hi + 1, size=n, dtype=np.int64)


@dataclass(frozen=True)
class Exponential:
    """``round(X)``, ``X ~ Exp(mean)``, clipped to ``[floor, cap]``: the Anyscale output law.

    Clipping moves the tails onto the bounds, so the clipped mean is
    ``floor + mean * (exp(-floor/mean) - exp(-cap/mean))`` (rounding aside): 125.9 for
    ``Exponential(128, cap=512, floor=8)``, 28.3 for ``Exponential(128, cap=32)``.
    """

    mean: float
    cap: int
    floor: int = 1

    def __post_init__(self) -> None:
        _check_positive("Exponential.mean", self.mean)
        _check_int("Exponential.floor", self.floor, 1)
        _check_int("Exponential.cap", self.cap, self.floor)

    def expected(self) -> float:
        """The mean after clipping (see the class docstring)."""
        m = self.mean
        return self.floor + m * (math.exp(-self.floor / m) - math.exp(-self.cap / m))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = np.rint(rng.exponential(self.mean, size=n)).astype(np.int64)
        return np.clip(x, self.floor, self.cap)


LengthDist = Fixed | Uniform | Exponential


def arrival_times(arrival: str, rate: float | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s): zeros for ``"burst"``; for ``"poisson"`` the first at 0, then
    exponential gaps of mean ``1/rate`` (as vLLM's ``benchmark_serving`` sends requests)."""
    if arrival == "burst":
        return np.zeros(n)
    gaps = rng.exponential(1.0 / rate, size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n]


@dataclass(frozen=True)
class WorkloadSpec:
    """A reproducible workload: how many requests, their lengths and arrivals.
    ``prompt_len=None``: natural held-out signature+docstring prompts (needs a tokenizer).
    ``output_len=None``: stop on EOS with cap ``max_new_tokens``. ``ignore_eos`` defaults to True
    exactly when ``output_len`` is a distribution (each request generates its drawn length).
    ``rate`` (requests/s) is required for, and only allowed with, ``arrival="poisson"``.
    """

    name: str
    num_requests: int
    prompt_len: LengthDist | None = None
    output_len: LengthDist | None = None
    max_new_tokens: int = 256
    arrival: str = "burst"
    rate: float | None = None
    ignore_eos: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("num_requests", self.num_requests, 1)
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("seed", self.seed, 0)
        for what, value in (("prompt_len", self.prompt_len), ("output_len", self.output_len)):
            if not isinstance(value, (Fixed, Uniform, Exponential, type(None))):
                raise WorkbenchError(f"{what} must be Fixed, Uniform, Exponential or None, "
                                     f"got {value!r}")
        if self.arrival not in ARRIVALS:
            raise WorkbenchError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.arrival == "poisson":
            _check_positive("the poisson arrival rate (requests/s)", self.rate)
        elif self.rate is not None:
            raise WorkbenchError(f"rate={self.rate!r} only applies to arrival='poisson'")
        if self.ignore_eos is None:
            object.__setattr__(self, "ignore_eos", self.output_len is not None)
        elif not isinstance(self.ignore_eos, bool):
            raise WorkbenchError(f"ignore_eos must be True, False or None, got {self.ignore_eos!r}")


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    """Token ids of ``text`` from a transformers tokenizer or a ``tokenizers.Tokenizer``."""
    if not special and getattr(tokenizer, "backend_tokenizer", None) is not None:
        tokenizer = tokenizer.backend_tokenizer  # fast path, no "longer than max length" warning
    out = tokenizer.encode(text, add_special_tokens=special)
    return list(getattr(out, "ids", out))


def natural_prompts(tokenizer: Any, n: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` held-out signature+docstring prompts, tokenized, in a seeded order (the ~300 prompts
    repeat, freshly shuffled, when ``n`` is larger). None ends with a newline."""
    from workbench.training.prompts import load_prompts

    texts = load_prompts("signature+docstring")
    order = np.concatenate([rng.permutation(len(texts)) for _ in range(-(-n // len(texts)))])
    return [_encode(tokenizer, texts[i], special=True) for i in order[:n]]


def code_windows(tokenizer: Any, lengths: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """Windows of exactly ``lengths[i]`` tokens of held-out standard-library code.

    Each window starts at the top of a random held-out document and runs on into the next ones
    (joined by EOS, as in the training stream) if it is short. Documents are tokenized only when
    a window reaches them (the same ids as tokenizing the whole text). A window slides right by
    up to 32 tokens so that its last token is neither EOS nor contains a newline (a prompt ending
    in a newline is followed by EOS at once).
    """
    from workbench.training.prompts import EOS_TEXT, load_heldout_text

    docs = [d for d in load_heldout_text().split(EOS_TEXT) if d]
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [] if eos is None else [int(eos)]
    doc_ids = functools.cache(lambda k: _encode(tokenizer, docs[k], special=False) + sep)
    bad_end = functools.cache(lambda t: t == eos or "\n" in tokenizer.decode([t]))

    windows = []
    for length, start in zip(lengths.tolist(), rng.integers(0, len(docs), size=len(lengths))):
        ids, j = [], int(start)
        while len(ids) < length + _WINDOW_SLACK:  # this document, then the next ones
            ids += doc_ids(j % len(docs))
            j += 1
        shift = next((s for s in range(_WINDOW_SLACK) if not bad_end(ids[s + length - 1])), 0)
        windows.append(ids[shift:shift + length])
    return windows


def make_requests(spec: WorkloadSpec, tokenizer: Any = None, vocab_size: int | None = None,
                  context: int | None = None) -> list[Request]:
    """The requests of ``spec``, ids ``0..n-1`` in arrival order; the same for the same seed.

    With a ``context`` (the model's maximum length) every request fits it: prompts are cut to at
    most ``context - 1`` tokens (natural prompts keep their first tokens) and each output length
    (or ``max_new_tokens`` cap) to ``context - prompt_len``. Lengths, arrivals and prompt
    choices use separate random streams of the seed, so overriding one knob leaves the others
    as they were. Without a tokenizer the prompts are random ids in ``[0, vocab_size)``.
    """
    if not isinstance(spec, WorkloadSpec):
        raise WorkbenchError(f"make_requests needs a WorkloadSpec, got {type(spec).__name__}")
    _check_int("context", 2 if context is None else context, 2)
    n, cut = spec.num_requests, (None if context is None else context - 1)
    rng_prompt_len, rng_output_len, rng_arrival, rng_ids = (
        np.random.default_rng([spec.seed, k]) for k in range(4))
    if spec.prompt_len is None:
        if tokenizer is None:
            raise WorkbenchError(f"workload {spec.name!r} uses the held-out prompts, which need a "
                                 "tokenizer: pass tokenizer= or set prompt_len")
        prompts = [p[:cut] for p in natural_prompts(tokenizer, n, rng_ids)]
    else:
        lengths = np.minimum(spec.prompt_len.sample(rng_prompt_len, n), cut or np.inf)
        if tokenizer is not None:
            prompts = code_windows(tokenizer, lengths.astype(np.int64), rng_ids)
        else:
            _check_int("vocab_size (needed for random prompts, without a tokenizer)",
                       vocab_size, 1)
            prompts = [rng_ids.integers(0, vocab_size, size=int(m)).tolist() for m in lengths]
    outputs = (np.full(n, spec.max_new_tokens) if spec.output_len is None
               else spec.output_len.sample(rng_output_len, n))
    arrivals = arrival_times(spec.arrival, spec.rate, n, rng_arrival)
    if context is not None:
        outputs = np.minimum(outputs, [context - len(p) for p in prompts])
    return [Request(prompt_ids=tuple(int(x) for x in prompt), max_new_tokens=int(out),
                    arrival_s=float(t), ignore_eos=spec.ignore_eos, id=i)
            for i, (prompt, out, t) in enumerate(zip(prompts, outputs, arrivals))]


def _override(spec: WorkloadSpec, overrides: dict[str, Any]) -> WorkloadSpec:
    known = {f.name for f in fields(WorkloadSpec)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise WorkbenchError(f"unknown workload fields {unknown}: expected some of {sorted(known)}")
    derived = {"rate": None} if overrides.get("arrival") == "burst" else {}  # a burst has no rate
    derived |= {"ignore_eos": None} if "output_len" in overrides else {}  # derive it again
    return replace(spec, **(derived | overrides))


def anyscale_lengths(cap: int, context: int | None = None) -> tuple[int, int]:
    """``(prompt_len, cap)`` of the Anyscale benchmark for a model of ``context`` tokens.

    The benchmark uses 512-token prompts and caps of 32/128/512/1536. When ``512 + cap`` does
    not fit, the prompt shrinks to ``context - cap``, but never below ``context // 4``; the cap
    then shrinks to what is left. At a 1,024-token context: caps 32/128/512 keep 512-token
    prompts, cap 1536 becomes a 256-token prompt with cap 768 (Exp(128) exceeds 768 with
    probability 0.25%, so the cap's effect is kept). ``context=None`` or >= 2,048: unchanged.
    """
    _check_int("cap", cap, 1)
    if context is None:
        return ANYSCALE_PROMPT, cap
    _check_int("context", context, 4)
    prompt = min(ANYSCALE_PROMPT, max(context - cap, context // 4))
    return prompt, min(cap, context - prompt)


def anyscale(cap: int = 512, context: int | None = None, **overrides: Any) -> WorkloadSpec:
    """The Anyscale continuous-batching benchmark: fixed prompts, outputs ~ Exp(mean 128)
    capped at ``cap``, all at t=0, exact lengths (``ignore_eos``); scaled by
    :func:`anyscale_lengths` to ``context``. 32 requests by default (a 2-core CPU)."""
    prompt, out_cap = anyscale_lengths(cap, context)
    spec = WorkloadSpec(name="anyscale" if cap == 512 else f"anyscale-cap{cap}", num_requests=32,
                        prompt_len=Fixed(prompt), output_len=Exponential(ANYSCALE_MEAN, out_cap))
    return _override(spec, overrides)


WORKLOADS: MappingProxyType[str, WorkloadSpec] = MappingProxyType({
    "anyscale": anyscale(512),
    # The GPU anchor workload (README, Measured results): 256 requests, 128-token prompts,
    # Exp(128) clipped to [8, 512], t=0.
    "design-anchor": WorkloadSpec(name="design-anchor", num_requests=256, prompt_len=Fixed(128),
                                  output_len=Exponential(128, cap=512, floor=8)),
    "natural": WorkloadSpec(name="natural", num_requests=64, max_new_tokens=256),
    "poisson": WorkloadSpec(name="poisson", num_requests=32, max_new_tokens=256,
                            arrival="poisson", rate=4.0),
})


def workload(name: str, **overrides: Any) -> WorkloadSpec:
    """The preset ``name`` of :data:`WORKLOADS` with fields replaced, for example
    ``workload("natural", num_requests=8, seed=1)``."""
    if name not in WORKLOADS:
        raise WorkbenchError(f"unknown workload {name!r}: expected one of {sorted(WORKLOADS)}")
    return _override(WORKLOADS[name], overrides)
