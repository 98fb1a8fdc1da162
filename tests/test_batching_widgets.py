"""The static-vs-continuous helpers and explorer of notebook 02, on a tiny random model."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import tiny_config, torch_threads  # noqa: E402
from workbench.engine import Request  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.model import LlamaModel  # noqa: E402
from workbench.viz.batching_widgets import (BatchingExplorer, batching_explorer,  # noqa: E402
                                            plot_strategies, run_strategies)


def _model() -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(tiny_config()).eval()


def test_run_strategies_same_tokens_and_fewer_steps():
    lengths = [8, 2, 5, 3, 4, 7, 2, 6]
    requests = [Request((1 + i, 2, 3), n, ignore_eos=True, id=i) for i, n in enumerate(lengths)]
    with torch_threads(1):
        runs = run_strategies(_model(), requests, slots=4)
    static, continuous = runs["static"], runs["continuous"]
    assert [t.output_ids for t in static.traces] == [t.output_ids for t in continuous.traces]
    assert [len(t.output_ids) for t in continuous.traces] == lengths
    assert static.busy_slot_steps == continuous.busy_slot_steps == sum(lengths)
    assert (len(static.timeline), len(continuous.timeline)) == (15, 12)  # the seed picture
    assert continuous.utilization > static.utilization
    fig = plot_strategies(runs)
    assert len(fig.axes) == 2 and "15 steps" in fig.axes[0].get_title()
    assert fig.axes[1].get_xlim() == fig.axes[0].get_xlim()  # one step axis for both
    plt.close(fig)
    with pytest.raises(WorkbenchError):
        run_strategies(_model(), requests, slots=0)


def test_explorer_builds_and_reruns():
    with torch_threads(1):
        explorer = batching_explorer(_model(), None, mean=4, cap=8, slots=2)
        assert isinstance(explorer, BatchingExplorer)
        assert "same tokens under both: True" in explorer.status.value
        explorer.cap.value = 1  # observed: re-runs; every request now has exactly 1 token
        runs = explorer.update()
    assert len(runs["static"].traces) == 2 * 2  # rounds x slots
    assert all(len(t.output_ids) == 1 for t in runs["continuous"].traces)
    assert runs["static"].utilization == runs["continuous"].utilization == 1.0
    plt.close("all")
