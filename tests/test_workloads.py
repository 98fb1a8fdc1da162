"""Workloads: length laws, arrivals, presets, and requests cut from held-out code."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.errors import WorkbenchError
from workbench.workloads import (
    ANYSCALE_CAPS,
    WORKLOADS,
    Exponential,
    Fixed,
    Uniform,
    WorkloadSpec,
    anyscale,
    anyscale_lengths,
    arrival_times,
    make_requests,
    workload,
)


class BundledTokenizer:
    """The bundled model's tokenizer.json through ``tokenizers`` alone, with the two attributes
    the workloads use from a transformers tokenizer (it spares the tests transformers' import)."""

    eos_token_id = 0

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        from workbench.model.loading import BUNDLED_MODEL, DATA_DIR

        self._tok = Tokenizer.from_file(str(DATA_DIR / "models" / BUNDLED_MODEL / "tokenizer.json"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def tokenizer():
    return BundledTokenizer()


# ------------------------------------------------------------------------- length laws


def test_fixed_and_uniform_bounds_and_means():
    rng = np.random.default_rng(0)
    assert (Fixed(7).sample(rng, 5) == 7).all()
    x = Uniform(10, 20).sample(rng, 20_000)
    assert x.min() == 10 and x.max() == 20  # both ends included
    assert abs(x.mean() - 15) < 0.2


@pytest.mark.parametrize("dist", [Exponential(128, cap=512, floor=8), Exponential(128, cap=32),
                                  Exponential(128, cap=1536)])
def test_exponential_bounds_and_clipped_mean(dist):
    x = dist.sample(np.random.default_rng(1), 20_000)
    assert x.dtype.kind == "i" and x.min() >= dist.floor and x.max() <= dist.cap
    assert abs(x.mean() - dist.expected()) < 0.03 * dist.expected()


def test_exponential_expected_matches_docstring():
    assert Exponential(128, cap=512, floor=8).expected() == pytest.approx(125.9, abs=0.05)
    assert Exponential(128, cap=32).expected() == pytest.approx(28.3, abs=0.05)


@settings(max_examples=25, deadline=None)
@given(lo=st.integers(1, 50), span=st.integers(0, 50), mean=st.floats(0.5, 300),
       floor=st.integers(1, 10), extra=st.integers(0, 100), seed=st.integers(0, 2**32 - 1))
def test_samples_stay_in_bounds(lo, span, mean, floor, extra, seed):
    rng = np.random.default_rng(seed)
    u = Uniform(lo, lo + span).sample(rng, 200)
    assert u.min() >= lo and u.max() <= lo + span
    e = Exponential(mean, cap=floor + extra, floor=floor).sample(rng, 200)
    assert e.min() >= floor and e.max() <= floor + extra


@pytest.mark.parametrize("make", [lambda: Fixed(0), lambda: Uniform(5, 4), lambda: Uniform(0, 3),
                                  lambda: Exponential(0, 10), lambda: Exponential(10, 4, floor=5),
                                  lambda: Exponential(float("nan"), 10), lambda: Fixed(2.5)])
def test_bad_distributions_raise(make):
    with pytest.raises(WorkbenchError):
        make()


# ----------------------------------------------------------------------------- arrivals


def test_poisson_rate_is_roughly_right():
    t = arrival_times("poisson", 5.0, 4000, np.random.default_rng(0))
    assert t[0] == 0 and (np.diff(t) > 0).all()
    assert abs((len(t) - 1) / t[-1] - 5.0) < 0.5
    assert (arrival_times("burst", None, 6, np.random.default_rng(0)) == 0).all()


# --------------------------------------------------------------------------------- spec


@pytest.mark.parametrize("kwargs", [
    dict(num_requests=0), dict(arrival="steady"), dict(arrival="poisson"),
    dict(arrival="poisson", rate=-1.0), dict(rate=2.0), dict(output_len=128),
    dict(prompt_len=(1, 2)), dict(max_new_tokens=0), dict(seed=-1), dict(ignore_eos="yes")])
def test_bad_specs_raise(kwargs):
    with pytest.raises(WorkbenchError):
        WorkloadSpec(**{"name": "x", "num_requests": 4} | kwargs)


def test_ignore_eos_follows_output_len():
    assert WorkloadSpec("a", 2, output_len=Fixed(4)).ignore_eos is True
    assert WorkloadSpec("a", 2).ignore_eos is False
    assert WorkloadSpec("a", 2, output_len=Fixed(4), ignore_eos=False).ignore_eos is False
    assert workload("anyscale", output_len=None).ignore_eos is False  # derived again
    assert workload("natural", output_len=Fixed(3)).ignore_eos is True


def test_presets_and_overrides():
    assert set(WORKLOADS) >= {"anyscale", "design-anchor", "natural", "poisson"}
    anchor = WORKLOADS["design-anchor"]
    assert (anchor.num_requests, anchor.prompt_len, anchor.output_len, anchor.arrival) == (
        256, Fixed(128), Exponential(128, cap=512, floor=8), "burst")
    assert WORKLOADS["anyscale"].prompt_len == Fixed(512)
    assert WORKLOADS["anyscale"].output_len == Exponential(128, cap=512)
    assert WORKLOADS["natural"].prompt_len is None and WORKLOADS["natural"].max_new_tokens == 256
    assert WORKLOADS["poisson"].rate == 4.0
    assert workload("natural", num_requests=3).num_requests == 3
    assert workload("poisson", arrival="burst").rate is None  # a burst drops the rate
    with pytest.raises(WorkbenchError, match="unknown workload"):
        workload("nope")
    with pytest.raises(WorkbenchError, match="unknown workload fields"):
        workload("natural", requests=3)
    with pytest.raises(TypeError):
        WORKLOADS["x"] = anchor  # read-only


def test_anyscale_scaling_rule():
    assert [anyscale_lengths(c, 1024) for c in ANYSCALE_CAPS] == [
        (512, 32), (512, 128), (512, 512), (256, 768)]
    assert [anyscale_lengths(c, 2048) for c in ANYSCALE_CAPS] == [(512, c) for c in ANYSCALE_CAPS]
    assert anyscale_lengths(1536) == (512, 1536)
    spec = anyscale(1536, context=1024, num_requests=4)
    assert spec.prompt_len == Fixed(256) and spec.output_len.cap == 768 and spec.num_requests == 4


@settings(max_examples=40, deadline=None)
@given(cap=st.integers(1, 4096), context=st.integers(4, 8192))
def test_anyscale_always_fits(cap, context):
    prompt, out = anyscale_lengths(cap, context)
    assert prompt >= 1 and 1 <= out <= cap and prompt + out <= context


# ----------------------------------------------------------------------------- requests


def test_code_windows_are_real_heldout_code(tokenizer):
    from workbench.training.prompts import load_heldout_text

    text = load_heldout_text()
    reqs = make_requests(anyscale(512, num_requests=6), tokenizer, context=1024)
    assert [r.id for r in reqs] == list(range(6))
    for r in reqs:
        assert len(r.prompt_ids) == 512 and r.ignore_eos and r.arrival_s == 0
        assert 1 <= r.max_new_tokens <= 512
        decoded = tokenizer.decode(list(r.prompt_ids))
        assert decoded in text  # a contiguous piece of the held-out documents
        assert not decoded.endswith("\n") and r.prompt_ids[-1] != 0


def test_natural_prompts(tokenizer):
    from workbench.training.prompts import load_prompts

    texts = set(load_prompts("signature+docstring"))
    reqs = make_requests(workload("natural", num_requests=12), tokenizer, context=1024)
    for r in reqs:
        decoded = tokenizer.decode(list(r.prompt_ids))
        assert decoded in texts and not decoded.endswith("\n")
        assert r.max_new_tokens == 256 and not r.ignore_eos
    assert len({r.prompt_ids for r in reqs}) == 12  # no repeats before the prompts run out


def test_deterministic_by_seed_and_independent_streams(tokenizer):
    spec = workload("poisson", num_requests=10)
    a, b = make_requests(spec, tokenizer), make_requests(spec, tokenizer)
    assert a == b
    c = make_requests(workload("poisson", num_requests=10, seed=1), tokenizer)
    assert [r.prompt_ids for r in c] != [r.prompt_ids for r in a]
    arrivals = [r.arrival_s for r in a]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    d = make_requests(workload("poisson", num_requests=10, output_len=Fixed(9)), tokenizer)
    assert [(r.prompt_ids, r.arrival_s) for r in d] == [(r.prompt_ids, r.arrival_s) for r in a]
    assert all(r.max_new_tokens == 9 and r.ignore_eos for r in d)


@pytest.mark.parametrize("context", [16, 100, 1024])
def test_requests_fit_the_context(tokenizer, context):
    specs = [workload("natural", num_requests=8), anyscale(1536, num_requests=4),
             workload("design-anchor", num_requests=8, prompt_len=Uniform(1, 2000))]
    for spec in specs:
        for r in make_requests(spec, tokenizer, context=context):
            assert len(r.prompt_ids) >= 1 and r.max_new_tokens >= 1
            assert len(r.prompt_ids) + r.max_new_tokens <= context


def test_random_prompts_without_tokenizer():
    spec = workload("design-anchor", num_requests=16)
    reqs = make_requests(spec, vocab_size=50, context=300)
    ids = np.concatenate([r.prompt_ids for r in reqs])
    assert ids.min() >= 0 and ids.max() < 50
    assert all(len(r.prompt_ids) == 128 and 8 <= r.max_new_tokens <= 172 for r in reqs)
    assert make_requests(spec, vocab_size=50) == make_requests(spec, vocab_size=50)
    with pytest.raises(WorkbenchError, match="vocab_size"):
        make_requests(spec)
    with pytest.raises(WorkbenchError, match="tokenizer"):
        make_requests(workload("natural"), vocab_size=50)
    with pytest.raises(WorkbenchError, match="context"):
        make_requests(spec, vocab_size=50, context=1)


def test_poisson_preset_spreads_arrivals():
    reqs = make_requests(workload("poisson", num_requests=400, prompt_len=Fixed(4)), vocab_size=9)
    rate = (len(reqs) - 1) / reqs[-1].arrival_s
    assert math.isclose(rate, 4.0, rel_tol=0.2)
