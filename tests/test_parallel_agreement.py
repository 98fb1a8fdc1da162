"""bf16 grids against one device (``workbench.parallel.agreement``, ``bench agree``), gloo ranks.

The bound is twice one device's own bf16 error (the triangle inequality through the fp32 logits);
a split that is right stays within it on the bundled model and random checkpoints of several
shapes, and one that is wrong (query heads of the other rank) does not.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import BUNDLED_DIR, tiny_config, torch_threads, write_tiny_checkpoint
from workbench.bench.agree_cli import parse_grids
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.model.config import RopeScaling
from workbench.parallel import ParallelConfig
from workbench.parallel.agreement import AgreementCheck, check_agreement
from workbench.plug import library, override

SHAPES = {  # uneven vocabularies and layer counts, biases, tied head, llama3 RoPE
    "mha-bias-tied": dict(vocab_size=90, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                          qkv_bias=True, model_type="qwen2", tie_word_embeddings=True),
    "llama3-biases": dict(vocab_size=80, hidden_size=128, intermediate_size=64,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=16, qkv_bias=True, o_bias=True, mlp_bias=True,
                          rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32)),
}
GRIDS = (ParallelConfig(tp=4), ParallelConfig(pp=3, micro_batches=2),
         ParallelConfig(tp=2, pp=2, micro_batches=2), ParallelConfig(tp=2, vocab_parallel=True))


def _assert_within(rows: list[dict]) -> None:
    for r in rows:
        assert r["one_device_max_abs_diff_vs_fp32"] > 0  # bf16 does round: the bound is not 0
        assert r["within_tolerance"], r
        assert r["max_abs_diff_vs_one_device"] <= r["tolerance"]
        # a token flips only at a near-tie of one device's logits
        assert r["largest_flipped_margin"] <= 2 * r["max_abs_diff_vs_one_device"]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_random_checkpoints_stay_within_twice_bf16s_error(tmp_path, name):
    write_tiny_checkpoint(tmp_path, tiny_config(**SHAPES[name]), seed=len(name))
    with torch_threads(1):
        out = check_agreement(AgreementCheck(str(tmp_path), GRIDS, rows=3, new_tokens=12),
                              timeout_s=120)
    assert [r["grid"] for r in out["rows"]] == [str(g) for g in GRIDS]
    assert len(out["sequences"]) == 3 and len(out["sequences"][0]) == 4 + 12
    _assert_within(out["rows"])


def test_bench_agree_on_the_bundled_model(tmp_path, capsys):
    path = tmp_path / "agree.json"
    with torch_threads(1):
        assert main(["bench", "agree", "--grids", "TP2,TP4,PP2,TP2xPP2,TP4+vocab", "--device",
                     "cpu", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    rows = report["results"]
    assert [r["system"] for r in rows] == ["workbench/TP2xPP1", "workbench/TP4xPP1",
                                           "workbench/TP1xPP2 m=2", "workbench/TP2xPP2 m=2",
                                           "workbench/TP4xPP1 vocab-parallel"]
    assert report["checks"]["all_within_tolerance"] and report["hardware"]["backend"] == "gloo"
    _assert_within(rows)
    # on a CPU a pipeline hands bf16 activations over unchanged and every stage runs one
    # device's kernels: its logits are one device's, bit for bit
    assert rows[2]["max_abs_diff_vs_one_device"] == 0.0
    assert all(r["top1_agreement"] == 1.0 for r in rows)  # a trained model: no near-ties here
    assert "within tolerance" in capsys.readouterr().out


def _q_heads_of_the_other_rank(name, shape, tp, tp_rank):
    """A wrong split: q_proj cut for rank tp - 1 - r, its k/v for rank r (heads mismatched)."""
    if "q_proj" in name:
        tp_rank = tp - 1 - tp_rank
    return library("tp.slice")(name, shape, tp, tp_rank)


def test_a_wrong_split_is_outside_the_tolerance():
    with torch_threads(1), override("tp.slice", _q_heads_of_the_other_rank):
        out = check_agreement(AgreementCheck(str(BUNDLED_DIR), (ParallelConfig(tp=2),),
                                             rows=2, new_tokens=6), timeout_s=120)
    row = out["rows"][0]
    assert not row["within_tolerance"] and row["max_abs_diff_vs_one_device"] > 10 * row["tolerance"]


def test_grid_names():
    assert parse_grids("tp2, PP4,TP2xPP2,TP4+vocab", 3) == (
        ParallelConfig(tp=2), ParallelConfig(pp=4, micro_batches=3),
        ParallelConfig(tp=2, pp=2, micro_batches=3), ParallelConfig(tp=4, vocab_parallel=True))


def test_bad_requests_fail_before_any_rank_starts():
    with pytest.raises(WorkbenchError, match="preset"):
        check_agreement(AgreementCheck("preset:llama-3.1-8b", (ParallelConfig(tp=2),)))
    with pytest.raises(WorkbenchError, match="bfloat16 or float16"):
        AgreementCheck("bundled", (ParallelConfig(tp=2),), dtype="float32")
    with pytest.raises(WorkbenchError, match="divisible by 3"):
        check_agreement(AgreementCheck("bundled", (ParallelConfig(tp=3),)))
    with pytest.raises(WorkbenchError, match="TP2y"):
        parse_grids("TP2,TP2y", 2)
