"""Offloading (notebook 06): every policy and schedule gives the tokens of the model held in memory."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_config, torch_threads, write_tiny_checkpoint
from workbench.engine import run_static
from workbench.engine.requests import Request
from workbench.errors import WorkbenchError
from workbench.model.loading import load_model
from workbench.model.presets import random_model
from workbench.offload import Budget, OffloadedModel, Policy, Split, WeightStore, check_policy
from workbench.offload.memory import plan_memory, staging_bytes
from workbench.offload.policy import parse_bytes
from workbench.offload.store import unit_layout

GIB = 1 << 30


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def _reference(model, prompts, steps, batch_size):
    requests = [Request(tuple(p), steps, ignore_eos=True, id=i) for i, p in enumerate(prompts)]
    return [t.output_ids for t in run_static(model, requests, batch_size=batch_size).traces]


POLICIES = [
    Policy(gpu_batch_size=2, num_gpu_batches=2),  # everything in fast memory
    Policy.from_percentages(0, 0, 0, 0, 0, 0, gpu_batch_size=2, num_gpu_batches=2),  # all on disk
    Policy.from_percentages(30, 20, 50, 0, 0, 100, gpu_batch_size=2, num_gpu_batches=2,
                            schedule="row"),
    Policy.from_percentages(30, 20, 0, 50, 50, 0, gpu_batch_size=2, num_gpu_batches=2,
                            overlap=False),
    Policy.from_percentages(0, 60, 0, 0, 0, 50, gpu_batch_size=1, num_gpu_batches=4,
                            cpu_attention=True),
]


@pytest.fixture(scope="module")
def bundled():
    with torch_threads(1):
        yield load_model("bundled")


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.label)
def test_bundled_tokens_identical_under_every_policy(bundled, policy, tmp_path):
    with torch_threads(1):
        prompts = _prompts(bundled.config.vocab_size, [5, 9, 7, 12])
        ref = _reference(bundled, prompts, 5, policy.gpu_batch_size)
        om = OffloadedModel.build(bundled, policy, Budget(GIB, tmp_path), "cpu", 12, 5,
                                  cold_disk=policy is POLICIES[1])  # one run reads really from disk
        try:
            run = om.generate(prompts, 5, trace=True)
        finally:
            om.close()
    assert run.output_ids == ref
    assert len(run.step_s) == 5 and run.decode_tok_s > 0
    disk_weights = policy.weights.disk > 0
    assert (run.bytes["disk_read"] > 0) == disk_weights
    assert {s.lane for s in run.timeline} >= ({"compute", "disk"} if disk_weights else {"compute"})


def test_row_schedule_reads_the_offloaded_weights_once_per_batch(bundled, tmp_path):
    with torch_threads(1):
        prompts = _prompts(bundled.config.vocab_size, [4] * 6)
        base = Policy.from_percentages(0, 0, gpu_batch_size=2, num_gpu_batches=3)
        om = OffloadedModel.build(bundled, base, Budget(GIB, tmp_path), "cpu", 4, 3,
                                  cold_disk=False)
        try:
            block = om.generate(prompts, 3)
            row = om.generate(prompts, 3, policy=Policy.from_percentages(
                0, 0, gpu_batch_size=2, num_gpu_batches=3, schedule="row"))
        finally:
            om.close()
    assert block.output_ids == row.output_ids
    per_step = sum(om.store.disk_len[1:])  # every unit but the (gathered) embedding
    assert block.bytes["disk_read"] == 3 * per_step
    assert row.bytes["disk_read"] == 3 * 3 * per_step


@pytest.mark.parametrize("overrides", [
    {},  # GQA, untied
    {"num_key_value_heads": 4, "tie_word_embeddings": True, "num_hidden_layers": 3},  # MHA, tied
    {"model_type": "qwen2", "qkv_bias": True, "hidden_size": 64, "head_dim": 16},
])
def test_random_checkpoints_tokens_identical(overrides, tmp_path):
    config = tiny_config(**overrides)
    with torch_threads(1):
        write_tiny_checkpoint(tmp_path / "ckpt", config, seed=3)
        model = load_model(tmp_path / "ckpt")
        prompts = _prompts(config.vocab_size, [3, 6, 4, 8], seed=1)
        ref = _reference(model, prompts, 6, 2)
        for policy in (Policy.from_percentages(0, 50, 0, 0, 0, 0, gpu_batch_size=2,
                                               num_gpu_batches=2),
                       Policy.from_percentages(50, 0, 0, 100, 100, 0, gpu_batch_size=2,
                                               num_gpu_batches=2, schedule="row")):
            om = OffloadedModel.build(model, policy, Budget(GIB, tmp_path / "disk"), "cpu", 8, 6,
                                      cold_disk=False)
            try:
                assert om.generate(prompts, 6).output_ids == ref, policy.label
            finally:
                om.close()


def test_random_store_equals_random_model_and_generates_the_same(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    policy = Policy.from_percentages(20, 30, gpu_batch_size=2)
    with torch_threads(1):
        model = random_model(config, seed=5)
        om = OffloadedModel.build(config, policy, Budget(GIB, tmp_path), "cpu", 6, 4, seed=5,
                                  cold_disk=False)
        try:
            prompts = _prompts(config.vocab_size, [6, 6])
            assert om.generate(prompts, 4).output_ids == _reference(model, prompts, 4, 2)
            tiers = om.store.tier_bytes()
            assert tiers["gpu"] and tiers["cpu"] and tiers["disk"]
        finally:
            om.close()


def test_disk_files_are_memory_mapped_and_hold_the_weights(bundled, tmp_path):
    store = WeightStore.from_model(bundled, Policy.from_percentages(0, 0), torch.device("cpu"),
                                   tmp_path)
    try:
        u = 1  # layer 0
        weights = store.params_from_slot(u, store.files[u].flat)  # the file itself as the slot
        for name, w in weights.items():
            assert torch.equal(w, dict(bundled.named_parameters())[name]), name
        assert sum(f.path.stat().st_size for f in store.files if f) >= 0.99 * sum(
            p.numel() * 4 for p in bundled.parameters())
    finally:
        store.close()


# ---- bad input: clear errors before any work -----------------------------------------------------
def test_percentages_must_add_up():
    with pytest.raises(WorkbenchError, match="add up to 100"):
        Split(50, 30, 30)
    with pytest.raises(WorkbenchError, match="exceed 100"):
        Policy.from_percentages(70, 50)
    with pytest.raises(WorkbenchError, match=r"\[0, 100\]"):
        Split(-10, 110, 0)
    with pytest.raises(WorkbenchError, match="schedule"):
        Policy(schedule="zigzag")
    with pytest.raises(WorkbenchError, match="gpu_batch_size"):
        Policy(gpu_batch_size=0)


def test_budget_below_one_layer_fails_before_any_file_is_written(bundled, tmp_path):
    disk = tmp_path / "disk"
    with pytest.raises(WorkbenchError, match="below one decoder layer"):
        OffloadedModel.build(bundled, Policy.from_percentages(0, 0), Budget(1 << 20, disk),
                             "cpu", 8, 4)
    assert not disk.exists()
    with pytest.raises(WorkbenchError, match="needs .* of fast memory"):
        OffloadedModel.build(bundled, Policy(), Budget(8 << 20, disk), "cpu", 8, 4)


def test_disk_folder_not_writable(bundled, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(WorkbenchError, match="not writable"):
        OffloadedModel.build(bundled, Policy.from_percentages(0, 0), Budget(GIB, blocker / "sub"),
                             "cpu", 8, 4)
    with pytest.raises(WorkbenchError, match="no disk folder"):
        OffloadedModel.build(bundled, Policy.from_percentages(0, 0), Budget(GIB), "cpu", 8, 4)


def test_wrong_number_of_prompts_and_sizes(bundled, tmp_path):
    om = OffloadedModel.build(bundled, Policy(gpu_batch_size=2), Budget(GIB, tmp_path), "cpu", 8, 4)
    with pytest.raises(WorkbenchError, match="runs 2 prompts"):
        om.generate([[1, 2]], 4)
    with pytest.raises(WorkbenchError, match="weights placement is fixed"):
        om.generate([[1, 2], [3, 4]], 4, policy=Policy.from_percentages(0, 100, gpu_batch_size=2))
    assert parse_bytes("4GiB") == 4 * GIB and parse_bytes("512 MB") == 512 * 10**6
    with pytest.raises(WorkbenchError, match="as a size"):
        parse_bytes("lots")
    with pytest.raises(WorkbenchError, match="positive"):
        Budget(0)


def test_memory_plan_counts_what_the_fast_tier_holds(bundled):
    config = bundled.config
    everything = plan_memory(Policy(), config, torch.float32, "cuda", 8, 8)
    assert everything.resident_weights == config.num_parameters() * 4 and everything.staging == 0
    policy = Policy.from_percentages(0, 100)
    streamed = plan_memory(policy, config, torch.float32, "cuda", 8, 8)
    assert streamed.resident_weights == 0
    _, _, slot_len = unit_layout(config, torch.float32, policy.weights, False)
    head, layer = slot_len[-1], slot_len[1]  # the head holds the (tied) 8192 x 256 matrix
    assert head >= 8192 * 256 * 4 > layer
    # double buffering from both ends of one buffer: the head and the layer loaded next to it
    assert streamed.staging == staging_bytes(list(slot_len[1:]), True) == head + layer
    no_overlap = plan_memory(Policy.from_percentages(0, 100, overlap=False), config,
                             torch.float32, "cuda", 8, 8)
    assert no_overlap.staging == head
    plan = check_policy(Policy.from_percentages(0, 100), config, torch.float32, Budget(GIB),
                        "cuda", 8, 8)
    assert plan.fast_total < GIB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", [(0, 100), (50, 50)], ids=["kv-in-ram", "kv-half-in-ram"])
def test_cuda_kv_in_pinned_ram_gives_the_device_tokens(bundled, kv, tmp_path):
    """On a GPU, keys/values written to pinned RAM without waiting (then read back on the same
    stream) give the tokens of the model held on the device, batch after batch."""
    model = load_model("bundled", "cuda")
    prompts = _prompts(model.config.vocab_size, [5, 9, 7, 12, 3, 8, 6, 10])
    ref = _reference(model, prompts, 6, 2)
    policy = Policy.from_percentages(20, 80, 0, *kv, gpu_batch_size=2, num_gpu_batches=4)
    om = OffloadedModel.build(model, policy, Budget(GIB, tmp_path), "cuda", 12, 6)
    try:
        run = om.generate(prompts, 6)
    finally:
        om.close()
    assert run.output_ids == ref
    assert run.bytes["kv_h2d"] > 0 and run.bytes["kv_d2h"] > 0
