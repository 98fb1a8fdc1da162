"""Labs 04-07 (tensor parallelism, pipeline, offloading, quantization): every check passes on the
library's own function, fails on the stub and on a realistic bug (naming the input), and the engine
run with the reference plugged in gives the engine's own result; overrides reach spawned ranks."""

from __future__ import annotations

import linecache
import tempfile

import pytest
import torch

import workbench.plug

from tests.helpers import tiny_config, torch_threads
from workbench import labs
from workbench.errors import WorkbenchError
from workbench.labs import ex_offload, ex_parallel, ex_pipeline, ex_quant
from workbench.plug import override

EXERCISES = ["tp.slice", "tp.vocab_range", "pipeline.timetable", "pipeline.bubble",
             "offload.schedule", "offload.step_time", "quant.scales", "quant.codes"]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _stub(*args, **kwargs):
    raise NotImplementedError("write this function")


@pytest.mark.parametrize("name", EXERCISES)
def test_reference_passes_and_stub_fails(name):
    ex = labs.get(name)
    module = ex.reference.__module__
    assert module.startswith("workbench.") and "labs" not in module  # the library's own
    assert ex.plug == name  # the engine can run the student's function
    for seed in (0, 1, 2):
        result = labs.check(name, ex.reference, seed=seed, quiet=True)
        assert result.passed, result.message
        assert result.cases == len(ex.edge_cases) + ex.trials
    stub = labs.check(name, _stub, seed=0, quiet=True)
    assert not stub.passed and "not implemented" in stub.message and stub.cases == 0
    assert len(ex.hints) >= 2


# ----------------------------------------------------------------------------- realistic bugs

def _tp_slice_o_proj_by_rows(name, shape, tp, tp_rank):
    """Splits every projection by output rows, o_proj and down_proj too."""
    if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj",
                               "down_proj"):
        n = shape[0] // tp
        return 0, tp_rank * n, (tp_rank + 1) * n
    return None


def _vocab_floor(vocab_size, tp, tp_rank):
    per = vocab_size // tp  # floor: the last rows belong to nobody
    return tp_rank * per, (tp_rank + 1) * per


def _timetable_one_slot_too_many(p, m):
    return [[(s, t - s) for s in range(p) if 0 <= t - s < m] for t in range(m + p)]


def _bubble_one_span(events, p):
    """Counts the idle time between forward passes as bubble."""
    busy = sum(e.end - e.start for e in events)
    return 1 - busy / (p * (max(e.end for e in events) - min(e.start for e in events)))


def _order_row_loops_swapped(schedule, num_units, num_batches):
    if schedule == "block":
        return [(u, list(range(num_batches))) for u in range(num_units)]
    return [(u, [k]) for u in range(num_units) for k in range(num_batches)]


def _step_time_no_overlap_term(loads, comps, num_batches, schedule, overlap):
    n = num_batches
    if schedule == "block":
        return sum(max(ld, n * c) for ld, c in zip(loads, comps))
    return n * sum(max(ld, c) for ld, c in zip(loads, comps))


def _scales_wrong_qmax(x, config):
    """Uses 2^bits - 1 levels for the symmetric grid too."""
    scale, zero = labs.get("quant.scales").reference(x, config)
    if config.symmetric:
        qmax = 2 ** config.bits - 1
        scale = (x.abs().amax(-1) / qmax).to(config.scale_dtype)
    return scale, zero


def _codes_floor(x, scale, zero, config):
    shifted = x if zero is None else x - zero.float()[..., None]
    q = torch.floor(shifted / scale.float()[..., None])
    return q.clamp(-config.qmax if config.symmetric else 0, config.qmax)


@pytest.mark.parametrize("name, wrong, words", [
    ("tp.slice", _tp_slice_o_proj_by_rows, ["o_proj"]),
    ("tp.vocab_range", _vocab_floor, ["vocab_size=10", "tp=4"]),
    ("pipeline.timetable", _timetable_one_slot_too_many, ["time slots", "p=1, m=1"]),
    ("pipeline.bubble", _bubble_one_span, ["StageEvent", "p=2"]),
    ("offload.schedule", _order_row_loops_swapped, ["schedule='row'", "num_batches=3"]),
    ("offload.step_time", _step_time_no_overlap_term, ["overlap=0.0"]),
    ("quant.scales", _scales_wrong_qmax, ["symmetric=True", "scale"]),
    ("quant.codes", _codes_floor, ["x=tensor", "scale=tensor"]),
])
def test_realistic_bug_fails_naming_the_input(name, wrong, words):
    for seed in (0, 1):
        result = labs.check(name, wrong, seed=seed, quiet=True)
        assert not result.passed
        assert "input:" in result.message and "expected" in result.message
        for word in words:
            assert word in result.message, result.message


def test_non_nudged_scales_fail_with_the_dtype_step():
    """Scales not rounded for float16 storage put values off the grid: the check says where."""
    def plain(x, config):
        if config.symmetric:
            return (x.abs().amax(-1) / config.qmax).to(config.scale_dtype), None
        low = x.amin(-1)
        return ((x.amax(-1) - low) / config.qmax).to(config.scale_dtype), low.to(config.scale_dtype)
    result = labs.check("quant.scales", plain, seed=3, quiet=True)
    assert not result.passed and ("scale:" in result.message or "zero:" in result.message)


def test_timetable_order_within_a_slot_is_free():
    def reordered(p, m):
        return [[(s, t - s) for s in reversed(range(p)) if 0 <= t - s < m]
                for t in range(m + p - 1)]
    assert labs.check("pipeline.timetable", reordered, seed=0, quiet=True).passed


# ----------------------------------------------------------------------------- plugged in

def test_tp_slice_cuts_a_layer_in_process():
    from workbench.model.presets import random_model
    from workbench.parallel.illustrate import tensor_parallel_layer

    model = random_model(tiny_config(), seed=1)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    own = tensor_parallel_layer(model, ids, tp=2)
    yours = labs.try_in_engine("tp.slice", ex_parallel.TP_SLICE.reference,
                               lambda: tensor_parallel_layer(model, ids, tp=2))
    assert own["max_error"] < 1e-5 and torch.equal(yours["output"], own["output"])
    # a cut that is wrong but consistent (ranks swapped) still sums to the layer; one that is not
    # (o_proj by rows) fails in the layer's shapes
    swapped = lambda name, shape, tp, tp_rank: ex_parallel.TP_SLICE.reference(  # noqa: E731
        name, shape, tp, tp - 1 - tp_rank)
    with override("tp.slice", swapped):
        assert tensor_parallel_layer(model, ids, tp=2)["max_error"] < 1e-5
    with override("tp.slice", _tp_slice_o_proj_by_rows), pytest.raises(RuntimeError):
        tensor_parallel_layer(model, ids, tp=2)
    heads = labs.try_in_engine("tp.slice", ex_parallel.TP_SLICE.reference,
                               lambda: ex_parallel.rank_heads(model.config, 2))
    assert [h["kv_heads"] for h in heads] == [h["kv_heads_used"] for h in heads] == [[0], [1]]


def _cell_function(source: str, name: str, env: dict):
    """A function defined the way a notebook cell defines it: module ``__main__``, source in
    linecache under a made-up file name (IPython does the same), not importable."""
    filename = f"<ipython-input-{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__main__", **env}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def test_plugins_pack_notebook_functions():
    from workbench.parallel.plugins import pack, unpack

    fn = _cell_function("def my_range(vocab_size, tp, tp_rank):\n"
                        "    per = math.ceil(vocab_size / tp) + OFFSET\n"
                        "    return min(tp_rank * per, vocab_size), "
                        "min((tp_rank + 1) * per, vocab_size)\n",
                        "my_range", {"math": __import__("math"), "OFFSET": 0})
    packed = pack(fn)
    assert packed[0] == "source" and packed[3]["math"] == ("module", "math")
    again = unpack(packed)
    assert again is not fn and again(10, 4, 3) == fn(10, 4, 3) == (9, 10)
    assert pack(ex_offload.unit_times)[0] == "ref"  # importable: by reference
    assert pack(ex_parallel.VOCAB_RANGE.reference) == ("library", "tp.vocab_range",
                                                       "workbench.parallel.tensor")
    assert unpack(pack(ex_parallel.VOCAB_RANGE.reference)) is ex_parallel.VOCAB_RANGE.reference
    with pytest.raises(WorkbenchError, match="lambda"):
        pack(lambda v, t, r: (0, v))
    lock = __import__("threading").Lock()
    bad = _cell_function("def uses_lock(v, t, r):\n    return LOCK, v\n", "uses_lock",
                         {"LOCK": lock})
    with pytest.raises(WorkbenchError, match="LOCK"):
        pack(bad)


def test_overrides_reach_the_tp_ranks(tmp_path):
    """A notebook-style function plugged in runs on both spawned ranks (it leaves a trace there),
    and the reference plugged in gives the one-process tokens."""
    log = str(tmp_path / "calls.txt")
    spy = _cell_function(
        "def spy(name, shape, tp, tp_rank):\n"
        "    with open(LOG, 'a') as f:\n"
        "        f.write(f'{os.getpid()} {tp_rank} {name}\\n')\n"
        "    return library('tp.slice')(name, shape, tp, tp_rank)\n",
        "spy", {"LOG": log, "os": __import__("os"), "library": workbench.plug.library})
    prompts = [[505, 842, 66, 274], [8, 78]]
    with override("tp.slice", spy):
        result = labs.try_in_engine("tp.vocab_range", ex_parallel.VOCAB_RANGE.reference,
                                    lambda: ex_parallel.tp_generation(prompts, max_new_tokens=4))
    assert result["tokens"] == result["one_device"]
    calls = open(log).read().splitlines()
    assert {line.split()[1] for line in calls} == {"0", "1"}  # both ranks cut with the spy
    assert len({line.split()[0] for line in calls}) == 2  # in two other processes
    assert result["bytes_read"][0] == result["bytes_read"][1]


def test_pipeline_runs_the_timetable_on_two_stages():
    prompts = [[505, 842, 66, 274], [8, 78], [281, 375, 374], [66]]
    run = labs.try_in_engine(
        "pipeline.timetable", ex_pipeline.TIMETABLE.reference,
        lambda: labs.try_in_engine("pipeline.bubble", ex_pipeline.BUBBLE.reference,
                                   lambda: ex_pipeline.pp_generation(prompts, 2, 4, 3)))
    assert run["tokens"] == run["one_device"]
    steps = {e.step for e in run["events"]}
    for step in steps:  # each stage ran micro-batches 0..3 in its timetable row's order
        for stage in (0, 1):
            mine = sorted((e for e in run["events"] if e.step == step and e.stage == stage),
                          key=lambda e: e.start)
            assert [e.micro_batch for e in mine] == [0, 1, 2, 3]
    assert 0 < labs.get("pipeline.bubble").reference(run["events"], 2) < 1


def test_offload_executor_follows_the_plugged_order():
    from workbench.model.presets import random_model

    model = random_model(tiny_config(num_hidden_layers=3), seed=2)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]]
    own = ex_offload.offload_runs(model, prompts, 2, 3)
    yours = labs.try_in_engine("offload.schedule", ex_offload.SCHEDULE.reference,
                               lambda: ex_offload.offload_runs(model, prompts, 2, 3))
    for schedule in ("row", "block"):
        assert yours[schedule].output_ids == own[schedule].output_ids == own["block"].output_ids
        assert yours[schedule].bytes == own[schedule].bytes
    assert own["row"].bytes["disk_read"] == 2 * own["block"].bytes["disk_read"] > 0
    # a plugged-in order is what the loader reads: "block" run in the row order reloads every unit
    always_row = lambda schedule, num_units, num_batches: [  # noqa: E731
        (u, [k]) for k in range(num_batches) for u in range(num_units)]
    with override("offload.schedule", always_row):
        runs = ex_offload.offload_runs(model, prompts, 2, 3)
    assert runs["block"].bytes["disk_read"] == own["row"].bytes["disk_read"]
    assert runs["block"].output_ids == own["block"].output_ids
    names, loads, comps = ex_offload.unit_times(own["block"])
    assert names[0] == "embed" and names[-1] == "head" and len(loads) == len(comps) == 5
    assert all(c > 0 for c in comps)


def test_cost_model_predicts_through_the_plug():
    from workbench.offload import Policy, Split
    from workbench.offload.cost import Calibration, predict

    cal = Calibration("cpu", 1e9, float("inf"), 1e10, 1e-3, 1e-5, 2e-3, 1e-5, 1e9,
                      overlap=0.7, step_fixed_s=1e-3, source="given")
    config = tiny_config(num_hidden_layers=4)
    policies = [Policy(weights=Split(0, 0, 100), gpu_batch_size=2, num_gpu_batches=4, schedule=s)
                for s in ("row", "block")]
    own = [predict(p, config, torch.float32, cal, 8, 4) for p in policies]
    yours = labs.try_in_engine("offload.step_time", ex_offload.STEP_TIME.reference,
                               lambda: [predict(p, config, torch.float32, cal, 8, 4)
                                        for p in policies])
    times = lambda preds: [(p.prefill_s, p.decode_step_s) for p in preds]  # noqa: E731
    assert times(yours) == times(own)
    assert own[0].decode_step_s > own[1].decode_step_s  # row reloads every unit per batch
    with override("offload.step_time", lambda *a: 0.0):
        step = predict(policies[1], config, torch.float32, cal, 8, 4).decode_step_s
    assert step == cal.step_fixed_s


def test_quantizer_plugged_into_the_model():
    from workbench.model.presets import random_model
    from workbench.quant.groupwise import QuantConfig

    model = random_model(tiny_config(), seed=3, std=0.5)
    windows = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    for config in (QuantConfig(4, 16, True), QuantConfig(8, None, False)):
        own = ex_quant.quantized_quality(model, config, windows, prompts, max_new_tokens=4)
        run = lambda: ex_quant.quantized_quality(model, config, windows, prompts,  # noqa: E731
                                                 max_new_tokens=4)
        yours = labs.try_in_engine(
            "quant.scales", ex_quant.SCALES.reference,
            lambda: labs.try_in_engine("quant.codes", ex_quant.CODES.reference, run))
        assert yours == own
    with override("quant.codes", lambda x, scale, zero, config: torch.zeros_like(x)):
        zeroed = ex_quant.quantized_quality(model, QuantConfig(8, None, True), windows, prompts,
                                            max_new_tokens=4)
    assert zeroed["perplexity"] != own["perplexity"]  # the plugged codes are what the model uses


def test_a_stub_is_skipped_by_try_in_engine(capsys):
    ran = []
    assert labs.try_in_engine("offload.schedule", _stub, lambda: ran.append(1)) is None
    assert not ran and "skipped" in capsys.readouterr().out


def test_offload_runs_use_a_temporary_disk_folder():
    before = set(__import__("os").listdir(tempfile.gettempdir()))
    from workbench.model.presets import random_model

    ex_offload.offload_runs(random_model(tiny_config(num_hidden_layers=1)), [[1, 2], [3, 4]], 1, 2)
    left = {p for p in set(__import__("os").listdir(tempfile.gettempdir())) - before
            if p.startswith("lab06-")}
    assert not left
