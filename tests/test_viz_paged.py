"""The figures and the block-map explorer of notebook 03, on a tiny random model."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import tiny_config, torch_threads  # noqa: E402
from workbench.engine import ContinuousEngine, EngineConfig, Request, run_continuous  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.kv.blocks import BlockManager  # noqa: E402
from workbench.model import LlamaModel  # noqa: E402
from workbench.viz.paged import (plot_block_map, plot_budget_sweep, plot_decode_profile,  # noqa: E402
                                 plot_pool, plot_reservation, plot_time_split, plot_waste,
                                 waste_split)
from workbench.viz.paged_widgets import BlockMapExplorer, block_map_explorer, run_paged  # noqa: E402


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(tiny_config()).eval()


def _requests(n=5, new=10):
    return [Request(tuple(range(1 + i, 4 + 2 * i)), new, ignore_eos=True, id=i) for i in range(n)]


def _serve(model, requests, **config):
    config = EngineConfig(max_num_seqs=len(requests), max_num_batched_tokens=64,
                          chunked_prefill=True, **config)
    engine = ContinuousEngine(model, config, record_blocks=True)
    with torch_threads(1):
        run = run_continuous(model, requests, config, engine=engine)
    return run, engine


def test_reservation_and_waste_of_one_request(model):
    request = _requests(1, new=12)
    _, slot = _serve(model, request, max_model_len=48)
    _, paged = _serve(model, request, kv="paged", block_size=4)
    ax = plot_reservation({"max-length": slot.kv_history, "paged": paged.kv_history})
    assert len(ax.get_lines()) == 3 and ax.get_ylim()[0] == 0
    splits = {"max-length": waste_split(slot.kv_history), "paged": waste_split(paged.kv_history)}
    for split in splits.values():
        assert sum(split.values()) == pytest.approx(1.0)
        assert min(split.values()) >= 0
    assert splits["max-length"]["real"] < 0.5  # 3..15 of 48 tokens
    assert plot_waste(splits).get_yticklabels()[1].get_text() == "paged"
    with pytest.raises(WorkbenchError, match="same request"):
        plot_reservation({"a": slot.kv_history, "b": slot.kv_history[:3]})
    with pytest.raises(WorkbenchError, match="capacity"):
        waste_split([])
    plt.close("all")


def test_pool_figure_shows_sharing_and_cache():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = [bm.allocate(), bm.allocate()]
    b = bm.fork(a)
    bm.publish(a, [1, 2, 3, 4], 4, [])
    gone = [bm.allocate()]
    bm.release_all(gone)
    ax = plot_pool(bm, {"A": a, "B": b})
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("A+B") == 2 and "ref 2" in texts and "free" in texts
    bm.release_all(b)
    bm.release_all(a)
    assert plot_pool(bm, {}).texts[0].get_text() == "cached"  # freed, still in the prefix cache
    with pytest.raises(WorkbenchError, match="pool has 6"):
        plot_pool(bm, {"A": [9]})
    plt.close("all")


def test_block_map_marks_preemptions(model):
    run, engine = _serve(model, _requests(4, new=12), kv="paged", block_size=2, num_blocks=12)
    assert engine.scheduler.num_preemptions > 0
    assert all(o == -1 for o in engine.block_map[-1])  # every block free at the end
    ax = plot_block_map(engine.block_map, engine.kv_history, highlight_step=3, title="tight")
    assert "tight" in ax.get_title() and "preemption" in ax.get_legend().get_texts()[0].get_text()
    with pytest.raises(WorkbenchError, match="steps"):
        plot_block_map(engine.block_map, engine.kv_history[:-1])
    plt.close("all")


def test_result_figures_from_json_like_rows():
    rows = [{"budget_gib": g, "policy": p, "output_tok_s": t, "peak_running": b}
            for g, p, t, b in [(0.001, "max-length reservation", 10.0, 1), (0.002,
                               "max-length reservation", 18.0, 2), (0.001, "paged", 25.0, 5),
                               (0.002, "paged", 30.0, 8)]]
    ax = plot_budget_sweep(rows)
    assert [l.get_label() for l in ax.get_lines()] == ["max-length reservation", "paged"]
    assert list(ax.get_lines()[1].get_ydata()) == [25.0, 30.0]
    assert plot_budget_sweep(rows, "peak_running").get_ylabel() == "peak batch"
    profile = [{"variant": v, "batch": b, "context": 128, "step_ms": s * b ** 0.1, "floor_ms": 0.8}
               for v, s in (("plain", 2.5), ("fused-compiled-triton", 1.5)) for b in (1, 8, 64)]
    ax = plot_decode_profile(profile, 128)
    assert len(ax.get_lines()) == 3  # two variants and the floor
    with pytest.raises(WorkbenchError, match="context 512"):
        plot_decode_profile(profile, 512)
    split = {"decode_s": 2.0, "prefill_s": 1.0, "decode_floor_s": 0.5, "prefill_floor_s": 0.1}
    ax = plot_time_split([{"system": "a", "time_split": split, "fraction_of_floor": 0.2},
                          {"system": "transformers/continuous"}])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a"]
    plt.close("all")


def test_explorer_reruns_and_keeps_outputs(model):
    requests = _requests(4, new=8)
    with torch_threads(1):
        explorer = block_map_explorer(model, requests, block_size=2, pool_tokens=32)
        assert isinstance(explorer, BlockMapExplorer)
        assert "equal to a pool with room for all: <b>True</b>" in explorer.status.value
        explorer.pool.value = explorer.pool.min  # observed: re-runs on the smallest pool
        figures = explorer.update()
        explorer.preemption.value = "swap"
        swapped = explorer.update()
    assert figures["same_outputs"] and swapped["same_outputs"]
    assert figures["preemptions"] > 0  # 32 tokens for 4 requests of up to 17 tokens
    explorer.step.value = 2
    assert "after step 3" in explorer.tables.value
    with pytest.raises(WorkbenchError, match="block_size"):
        BlockMapExplorer(model, requests, block_size=3)
    run, engine = run_paged(model, requests, 4, 16)
    assert engine.scheduler.blocks.num_free == 16 and len(run.traces) == 4
    plt.close("all")
