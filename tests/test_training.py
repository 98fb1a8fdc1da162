"""The bundled model's pipeline on a tiny corpus: documents, tokenizer, a few CPU steps."""

import json

import numpy as np
import pytest
import torch

from workbench.model import ForwardBatch, load_model, load_tokenizer
from workbench.training.corpus import documents_of, is_held_out
from workbench.training.tokenizer import EOS, save_tokenizer, train_tokenizer
from workbench.training.train import TrainConfig, lr_at, train, window_starts

SOURCE = '''"""Module docstring is not a document."""
import os

X = 1

@decorator
def first(a, b=2):
    """Add."""
    return a + b


class Second:
    def method(self):
        return 1

async def third():
    pass
'''


def test_documents_are_top_level_definitions_with_decorators():
    docs = documents_of(SOURCE, "pkg/mod.py")
    assert [d.name for d in docs] == ["first", "Second", "third"]
    assert docs[0].text.startswith("@decorator\ndef first")
    assert docs[1].text.endswith("return 1")
    assert documents_of("def broken(:\n", "bad.py") == []


def test_held_out_split_is_stable_and_about_one_in_twenty():
    paths = [f"pkg/module_{i}.py" for i in range(4000)]
    share = sum(map(is_held_out, paths)) / len(paths)
    assert 0.035 < share < 0.065
    assert is_held_out("json/decoder.py") == is_held_out("json/decoder.py")


def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    tok = train_tokenizer([SOURCE] * 20, vocab_size=300)
    save_tokenizer(tok, tmp_path, model_max_length=64)
    (tmp_path / "config.json").write_text("{}")
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def first(a, b=2):\n    return a + b"
    assert auto.decode(auto(text).input_ids) == text
    assert auto.eos_token == EOS and auto.convert_tokens_to_ids(EOS) == 0


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(99, cfg) - 0.1) < 1e-3 and lr_at(50, cfg) < lr_at(20, cfg)


def tiny_corpus(folder):
    """A training folder as ``prepare`` writes it: SOURCE 30 times, each ending in EOS (id 0)."""
    tok = train_tokenizer([SOURCE] * 20, vocab_size=300)
    save_tokenizer(tok, folder, model_max_length=64)
    ids = np.array((tok.encode(SOURCE).ids + [0]) * 30, dtype=np.uint16)
    np.save(folder / "train.npy", ids)
    np.save(folder / "heldout.npy", ids[:400])
    (folder / "meta.json").write_text(json.dumps({"vocab_size": tok.get_vocab_size(), "eos_id": 0}))
    return ids


def test_few_cpu_steps_write_a_checkpoint_transformers_loads(tmp_path):
    data = tmp_path / "data"
    ids = tiny_corpus(data)
    out = tmp_path / "model"
    cfg = TrainConfig(steps=6, batch_size=2, context=32, eval_every=3, eval_windows=2, warmup=2)
    log = train(data, out, cfg, device="cpu", progress=False)
    assert log["best"]["held_out_loss"] < 7 and len(log["eval"]) == 2
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((data / name).read_bytes())
    ours = load_model(out)
    assert load_tokenizer(out) is not None
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = torch.from_numpy(ids[:20].astype(np.int64))[None]  # [1, 20]
    with torch.no_grad():
        torch.testing.assert_close(ours(ForwardBatch.prefill(x)), hf(x).logits)


def test_aligned_windows_start_at_end_of_text():
    tokens = np.array([5, 0, 7, 8, 9, 0, 3, 4, 0, 6], dtype=np.uint16)
    assert window_starts(tokens, 4, None) is None  # anywhere
    assert window_starts(tokens, 4, eos_id=0).tolist() == [1, 5]  # 8 has 1 token after it, not 4
    with pytest.raises(ValueError, match="no end-of-text"):
        window_starts(tokens, 4, eos_id=1)


def test_aligned_training_sees_end_of_text_first(tmp_path, monkeypatch):
    import workbench.training.train as train_mod

    data = tmp_path / "data"
    tiny_corpus(data)
    firsts = []
    real = train_mod.windows

    def spy(tokens, starts, length, device):
        rows = real(tokens, starts, length, device)
        firsts.append(rows[:, 0].tolist())
        return rows

    monkeypatch.setattr(train_mod, "windows", spy)
    cfg = TrainConfig(steps=3, batch_size=4, context=32, eval_every=3, eval_windows=2, warmup=1,
                      align_documents=True)
    train(data, tmp_path / "model", cfg, device="cpu", progress=False)
    assert firsts[1:] == [[0] * 4] * 3  # firsts[0]: the held-out windows, not aligned


def test_prepare_then_train_commands_make_a_model_directory(tmp_path, monkeypatch, capsys):
    """``python -m workbench.training prepare`` then ``train`` on a tiny stand-in for the standard
    library: the held-out file goes to the held-out split, and ``--out`` is a model directory that
    our loader and transformers' both read."""
    import workbench.training.__main__ as cli
    from workbench.training.corpus import build_corpus, read_jsonl

    stdlib = tmp_path / "stdlib"
    for name in ("mod_1.py", "mod_2.py", "mod_69.py"):  # sha1 puts mod_69.py in the held-out split
        (stdlib / name).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / name).write_text(SOURCE.replace("first", name[:-3]))
    assert [is_held_out(n) for n in ("mod_1.py", "mod_2.py", "mod_69.py")] == [False, False, True]
    monkeypatch.setattr(cli, "build_corpus", lambda: build_corpus(stdlib))
    data, out = tmp_path / "corpus", tmp_path / "model"
    cli.main(["prepare", "--out", str(data), "--vocab-size", "300", "--context", "32"])
    meta = json.loads((data / "meta.json").read_text())
    assert meta["held_out_files"] == ["mod_69.py"] and meta["train_documents"] == 6
    assert [d.name for d in read_jsonl(data / "heldout.jsonl")] == ["mod_69", "Second", "third"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    train_ids = np.load(data / "train.npy")
    assert len(train_ids) == meta["train_tokens"] and (train_ids == meta["eos_id"]).sum() == 6
    first_doc = train_ids[:train_ids.tolist().index(meta["eos_id"])].tolist()
    assert tok.decode(first_doc) == read_jsonl(data / "train.jsonl")[0].text

    cli.main(["train", "--data", str(data), "--out", str(out), "--device", "cpu", "--steps", "4",
              "--batch-size", "2", "--context", "32", "--eval-every", "2", "--eval-windows", "1"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["device"] == "cpu"
    model = load_model(out)
    assert load_tokenizer(out).get_vocab() == tok.get_vocab()  # the tokenizer travels with it
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = torch.from_numpy(train_ids[:16].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ForwardBatch.prefill(x)), hf(x).logits)
