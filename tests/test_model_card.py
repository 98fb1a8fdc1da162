"""The bundled model's card (``python -m workbench.training.card``): its samples are what the engine
generates, and the script writes a card and a loss plot from a model directory."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from helpers import torch_threads
from workbench.engine import SamplingParams
from workbench.model import load_model, load_tokenizer
from workbench.training import card
from workbench.training.prompts import load_prompt_records

SHIPPED_LIMIT = 512  # the card's sampled generations: `--max-new-tokens` at its default


def test_shipped_card_shows_what_the_engine_generates():
    """The card is written by the script, never by hand: its greedy samples and its first sampled
    held-out completions are exactly what the engine generates today (a request's samples depend
    neither on its batch nor on its limit, so 5 prompts at batch 5 give the card's first 5)."""
    shipped = (card.MODEL_DIR / "README.md").read_text()
    assert f"limit\n{SHIPPED_LIMIT} new tokens" in shipped
    model, tok = load_model(card.MODEL_DIR), load_tokenizer(card.MODEL_DIR)
    records = load_prompt_records("signature+docstring", limit=card.SHOWN_SAMPLES)
    with torch_threads(1):
        greedy = card.generate(model, tok, list(card.GREEDY_PROMPTS), card.GREEDY_MAX_NEW_TOKENS,
                               SamplingParams(), batch_size=len(card.GREEDY_PROMPTS))
        sampled = card.generate(model, tok, [r["prompt"] for r in records], SHIPPED_LIMIT,
                                SamplingParams(**card.SAMPLING), batch_size=len(records))
    for c in greedy:
        assert f"{card.describe(c, card.GREEDY_MAX_NEW_TOKENS)}:\n\n" \
               f"{card.code_block(c.prompt + c.text)}" in shipped, c.prompt
    for c, r in zip(sampled, records):
        assert card.code_block(c.prompt + c.text) in shipped, r["source"]
        assert f"`{r['source']}`" in shipped or f"<code>{r['source']}</code>" in shipped


def test_card_script_writes_card_and_plot(tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(card.MODEL_DIR, model_dir)
    for name in ("README.md", "loss.png"):
        (model_dir / name).unlink()
    with torch_threads(1):
        card.main(["--model-dir", str(model_dir), "--prompts", "6", "--max-new-tokens", "16",
                   "--batch-size", "6"])
    text = (model_dir / "README.md").read_text()
    assert text.startswith("---\nlicense: mit\n") and "\n# stdlib-llama-7m\n" in text
    params = sum(p.numel() for p in load_model(model_dir).parameters())
    assert f"| parameters | {params:,} (" in text
    assert (model_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one row of length statistics, at the limit: 6 outputs of 1 to 16 tokens
    (row,) = re.findall(r"^\| 16 \| (\d+) \|.*\| (\d+) \| (\d+)% \|$", text, flags=re.M)
    assert 1 <= int(row[0]) <= int(row[1]) <= 16
    assert "wrote" in capsys.readouterr().out

    log = json.loads((model_dir / "training_log.json").read_text())
    (model_dir / "training_log.json").write_text(json.dumps(log | {"parameters": 5}))
    with pytest.raises(SystemExit, match="training_log.json says 5 parameters"):
        card.main(["--model-dir", str(model_dir)])
