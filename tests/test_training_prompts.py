"""The shipped held-out data (``data/heldout``, ``data/prompts``) is what
``python -m workbench.training.prompts`` builds, byte for byte, from the held-out documents."""

from __future__ import annotations

import json

import numpy as np
from tokenizers import Tokenizer

from workbench.training import prompts as P
from workbench.training.card import MODEL_DIR


def shipped_documents() -> list[dict]:
    """The held-out documents as ``prepare`` wrote them, recovered from the shipped text (each
    document followed by EOS) and the manifest's (path, name) list."""
    texts = P.load_heldout_text().split(P.EOS_TEXT)
    names = P.load_corpus_info()["held_out_docs"]
    assert texts[-1] == "" and len(texts) == len(names) + 1
    return [{"path": path, "name": name, "text": text}
            for (path, name), text in zip(names, texts[:-1])]


def test_rebuilding_the_shipped_data_gives_the_same_bytes(tmp_path, monkeypatch, capsys):
    docs = shipped_documents()
    info = P.load_corpus_info()
    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    corpus = tmp_path / "corpus"  # what `prepare` leaves: the documents, tokens, manifest
    corpus.mkdir()
    with (corpus / "heldout.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    ids = tokenizer.encode("".join(d["text"] + P.EOS_TEXT for d in docs)).ids
    assert len(ids) == info["heldout_tokens"]
    np.save(corpus / "heldout.npy", np.array(ids, dtype=np.uint16))
    meta = {k: v for k, v in info.items() if k not in ("held_out_characters", "held_out_docs")}
    (corpus / "meta.json").write_text(json.dumps(meta | {"stdlib_root": "/build/machine/lib"}))

    out = {"PROMPTS_FILE": tmp_path / "p" / "prompts.jsonl",
           "HELDOUT_FILE": tmp_path / "h" / "heldout.txt.gz",
           "CORPUS_FILE": tmp_path / "corpus.json"}
    shipped = {name: getattr(P, name).read_bytes() for name in out}
    for name, path in out.items():
        monkeypatch.setattr(P, name, path)
    P.main(["--corpus", str(corpus)])
    assert "token for token: True" in capsys.readouterr().out  # the text gives the same tokens
    for name, path in out.items():
        assert path.read_bytes() == shipped[name], name
