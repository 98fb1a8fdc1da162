"""The CLI contract: generate's JSONL in/out, info, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.engine import generate_static
from workbench.model import load_model, load_tokenizer

PROMPTS = ["def fibonacci(n):", 'def read_config(path):\n    """Read the configuration file."""']


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_bundled_matches_engine(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]},
                                                 {"prompt": PROMPTS[1], "max_new_tokens": 5},
                                                 {"prompt_ids": [505, 842, 66]}])
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--prompts", str(prompts), "--output", str(out),
                 "--max-new-tokens", "12", "--no-progress", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["prompt"] == PROMPTS[0] and "prompt" not in rows[2]
    model, tok = load_model("bundled"), load_tokenizer("bundled")
    ids = [tok(PROMPTS[0]).input_ids, tok(PROMPTS[1]).input_ids, [505, 842, 66]]
    ref = generate_static(model, ids, [12, 5, 12], batch_size=1)
    for row, expected in zip(rows, ref.outputs):
        assert row["output_ids"] == expected.output_ids
        assert row["text"] == tok.decode(expected.output_ids, skip_special_tokens=True)
    assert len(rows[1]["output_ids"]) <= 5


def test_generate_paged_equals_contiguous(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS * 2])
    outputs = []
    for kv in (["--kv", "contiguous"], ["--kv", "paged", "--block-size", "4", "--num-blocks",
                                        "24", "--prefix-caching"]):
        out = tmp_path / f"{kv[1]}.jsonl"
        assert main(["generate", "--prompts", str(prompts), "--output", str(out),
                     "--strategy", "continuous", "--batch-size", "3", "--max-new-tokens", "20",
                     "--no-progress", "--device", "cpu", *kv]) == 0
        outputs.append([json.loads(line)["output_ids"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] and all(outputs[0])


def test_generate_random_checkpoint_without_tokenizer_equals_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         initializer_range=0.3, eos_token_id=127)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    write_jsonl(tmp_path / "p.jsonl", [{"prompt_ids": p} for p in prompts])
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompts",
                 str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                 "--max-new-tokens", "10", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    for p, row in zip(prompts, rows):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                          pad_token_id=127)[0, len(p):].tolist()
        assert row["output_ids"] == ref and row["text"] is None


def test_sampling_is_seeded(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}] * 2)
    args = ["generate", "--prompts", str(prompts), "--output", "-", "--max-new-tokens", "8",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("rows, extra, message", [
    (["{not json"], [], "p.jsonl:1: malformed JSON"),
    ([{"prompt": "x"}, "[1, 2]"], [], "p.jsonl:2: expected a JSON object"),
    ([{"text": "x"}], [], "exactly one of"),
    ([{"prompt_ids": [1, "a"]}], [], "non-empty list of integers"),
    ([{"prompt_ids": [1, 99999]}], [], "outside the vocabulary"),
    ([{"prompt": "x", "max_new_tokens": -3}], [], "max_new_tokens"),
    ([{"prompt_ids": [5] * 1025}], [], "longer than the model's context of 1024"),
    ([{"prompt": "x"}], ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    ([{"prompt": "x"}], ["--model", "/no/such/dir"], "model directory not found"),
    ([{"prompt": "x"}], ["--device", "tpu"], "unknown device 'tpu'"),
    ([{"prompt": "x"}], ["--dtype", "int3"], "invalid choice"),
    ([{"prompt": "x"}], ["--kv", "paged"], "use --strategy continuous"),
    ([{"prompt": "x"}], ["--strategy", "continuous", "--prefix-caching"], "need(s) --kv paged"),
    ([{"prompt": "x"}], ["--strategy", "continuous", "--kv", "paged", "--block-size", "0"],
     "block_size must be >= 1"),
    ([{"prompt": "x"}], ["--tp", "2", "--timeout", "0"], "--timeout must be a number of seconds > 0"),
    ([{"prompt": "x"}], ["--tp", "2", "--timeout", "inf"], "--timeout must be a number of seconds > 0"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, rows, extra, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    code = main(["generate", "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cuda_on_a_machine_without_it(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    assert main(["generate", "--prompts", str(prompts), "--output", "-", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_corrupt_checkpoint_via_subprocess(tmp_path):
    """The installed entry point, end to end: a truncated safetensors file, no traceback."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    bundled = Path(__file__).resolve().parents[1] / "data/models/stdlib-llama-7m"
    (ckpt / "config.json").write_text((bundled / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes((bundled / "model.safetensors").read_bytes()[:5000])
    write_jsonl(tmp_path / "p.jsonl", [{"prompt_ids": [1, 2]}])
    proc = run_cli("generate", "--model", str(ckpt), "--prompts", str(tmp_path / "p.jsonl"),
                   "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2
    assert "corrupt or truncated" in proc.stderr and "Traceback" not in proc.stderr


def test_info_json(capsys):
    assert main(["info", "--json", "--quick", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stamp"]["num_devices"] >= 1 and report["measured"]["bandwidth_GB_s"] > 0


def test_non_llama_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                      "architectures": ["GPT2LMHeadModel"]}))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt_ids": [1]}])
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl"),
                 "--output", "-"]) == 2
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err


def test_generate_tp2_subprocess_equals_one_process_and_leaves_cleanly(tmp_path):
    """The command line a student types: two gloo ranks give one process's tokens, and the
    interpreter exits without the resource tracker's 'leaked semaphore' warning (tqdm's lock)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}])
    outs = {}
    for tp in ("1", "2"):
        out = tmp_path / f"tp{tp}.jsonl"
        done = run_cli("generate", "--prompts", str(prompts), "--output", str(out), "--tp", tp,
                       "--max-new-tokens", "6", "--device", "cpu")
        assert done.returncode == 0, done.stderr
        assert "leaked" not in done.stderr, done.stderr
        outs[tp] = json.loads(out.read_text())["output_ids"]
    assert outs["1"] == outs["2"] and len(outs["1"]) == 6
