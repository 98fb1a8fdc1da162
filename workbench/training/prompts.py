"""Realistic prompts and held-out text for the notebooks, from the bundled model's held-out files.

The bundled model never saw the held-out files of its corpus (1 standard-library file in 20, see
:mod:`workbench.training.corpus`), so their definitions make honest prompts:

* ``"signature+docstring"``: a function's decorators, ``def`` line and docstring, ending right
  after the closing triple quote. A method keeps its class's header line above it, with the
  original indentation, so the prompt still starts the way a training document does.
  Example: ``def b64encode(s, altchars=None):\\n    \"\"\"Encode the bytes-like object ...\"\"\"``.
* ``"signature"``: the decorators and ``def``/``class`` line of a top-level definition, ending
  with its ``:``.

No prompt ends with a newline: the byte-level tokenizer merges a newline with the indentation that
follows it, so a prompt ending in ``"\\n"`` is followed by EOS at once.

``python -m workbench.training.prompts`` rebuilds ``data/prompts/heldout_prompts.jsonl``,
``data/heldout/stdlib_heldout.txt.gz`` and ``data/heldout/corpus.json`` (the corpus manifest) from
``build/docs/heldout.jsonl`` and ``build/corpus/meta.json`` (written by
``python -m workbench.training prepare``). The notebooks only need the loaders below::

    from workbench.training.prompts import load_prompts, load_heldout_text
    prompts = load_prompts("signature+docstring", limit=64)
    text = load_heldout_text()  # held-out documents, each followed by "<|endoftext|>"
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import re
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.model.loading import BUNDLED_MODEL, DATA_DIR

PROMPTS_FILE = DATA_DIR / "prompts" / "heldout_prompts.jsonl"
HELDOUT_FILE = DATA_DIR / "heldout" / "stdlib_heldout.txt.gz"
CORPUS_FILE = DATA_DIR / "heldout" / "corpus.json"  # the corpus manifest, held-out documents listed
KINDS = ("signature+docstring", "signature")
EOS_TEXT = "<|endoftext|>"
MAX_PROMPT_TOKENS = 200

_TRAILING_COMMENT = re.compile(r":\s*#.*$")


# ----------------------------------------------------------------------------------- loaders


def load_prompts(kind: str | None = None, limit: int | None = None) -> list[str]:
    """Held-out prompts (all kinds, or ``"signature+docstring"`` / ``"signature"``), first
    ``limit`` of them.

    The order is fixed but mixed (a stable hash of each prompt), so the first 64 come from many
    different files rather than from the alphabetically first ones.
    """
    return [r["prompt"] for r in load_prompt_records(kind, limit)]


def load_prompt_records(kind: str | None = None, limit: int | None = None) -> list[dict]:
    """Like :func:`load_prompts`, with each prompt's ``source`` (``path::name``) and ``kind``."""
    if kind is not None and kind not in KINDS:
        raise WorkbenchError(f"unknown prompt kind {kind!r}: expected one of {KINDS} or None")
    if limit is not None and limit < 0:
        raise WorkbenchError(f"limit must be >= 0, got {limit}")
    if not PROMPTS_FILE.is_file():
        raise WorkbenchError(f"{PROMPTS_FILE} is missing: run `python -m workbench.training."
                             "prompts` after `python -m workbench.training prepare`")
    with PROMPTS_FILE.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if kind is None or r["kind"] == kind]
    return records if limit is None else records[:limit]


def load_corpus_info() -> dict:
    """The corpus manifest: Python version, split rule, document and token counts, the held-out
    files, and ``held_out_docs`` = ``[path, name]`` of each held-out document in text order."""
    if not CORPUS_FILE.is_file():
        raise WorkbenchError(f"{CORPUS_FILE} is missing: run `python -m workbench.training."
                             "prompts` after `python -m workbench.training prepare`")
    return json.loads(CORPUS_FILE.read_text())


def load_heldout_text() -> str:
    """The held-out documents concatenated in corpus order, each followed by ``<|endoftext|>``.

    Encoded with the bundled tokenizer, this is exactly the held-out token stream the model was
    evaluated on during training (432,759 tokens).
    """
    if not HELDOUT_FILE.is_file():
        raise WorkbenchError(f"{HELDOUT_FILE} is missing: run `python -m workbench.training."
                             "prompts` after `python -m workbench.training prepare`")
    with gzip.open(HELDOUT_FILE, "rt", encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------------- building


def _header(lines: list[str], node: ast.AST) -> str | None:
    """Decorators plus the ``def``/``class`` line(s) of ``node``, ending with its ``:``."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    body_line = node.body[0].lineno
    if body_line <= node.lineno:
        return None  # one-line definition: ``def f(): return 1``
    header = lines[first - 1:body_line - 1]
    while header and (not header[-1].strip() or header[-1].strip().startswith("#")):
        header.pop()  # blank lines and comments between the signature and the body
    if not header:
        return None
    header[-1] = _TRAILING_COMMENT.sub(":", header[-1].rstrip())
    text = "\n".join(header)
    return text if text.endswith(":") else None


def _docstring_end(lines: list[str], fn: ast.AST) -> str | None:
    """Lines from ``fn``'s signature's first line through its docstring's closing quotes."""
    doc = fn.body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)):
        return None
    last = lines[doc.end_lineno - 1].encode()[:doc.end_col_offset].decode()  # offsets are bytes
    if not last.endswith(('"""', "'''")):
        return None  # a one-quote docstring: not the shape the prompts promise
    first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    return "\n".join(lines[first - 1:doc.end_lineno - 1] + [last])


def prompts_of(doc: dict) -> list[dict]:
    """The prompts one held-out document yields (it is one top-level function or class)."""
    text, source = doc["text"], f"{doc['path']}::{doc['name']}"
    lines = text.splitlines()
    try:
        node = ast.parse(text).body[0]
    except (SyntaxError, ValueError, IndexError):
        return []
    out = []
    header = _header(lines, node)
    if header is not None:
        out.append({"prompt": header, "source": source, "kind": "signature"})
    functions = [(node, "")] if not isinstance(node, ast.ClassDef) else [
        (n, header + "\n") for n in node.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and header is not None]
    for fn, prefix in functions:
        body = _docstring_end(lines, fn)
        if body is not None:
            name = source if fn is node else f"{source}.{fn.name}"
            out.append({"prompt": prefix + body, "source": name, "kind": "signature+docstring"})
    return out


def _order_key(record: dict) -> str:
    return hashlib.sha1(f"{record['kind']}\0{record['source']}".encode()).hexdigest()


def build_prompts(docs: list[dict], tokenizer, max_tokens: int = MAX_PROMPT_TOKENS) -> list[dict]:
    """Every prompt of ``docs`` up to ``max_tokens`` tokens, duplicates dropped, in a stable mixed
    order: signature+docstring prompts first, then signature prompts."""
    records, seen = [], set()
    for doc in docs:
        for r in prompts_of(doc):
            if r["prompt"] in seen or r["prompt"].endswith("\n"):
                continue
            if len(tokenizer.encode(r["prompt"]).ids) > max_tokens:
                continue
            seen.add(r["prompt"])
            records.append(r)
    return sorted(records, key=lambda r: (KINDS.index(r["kind"]), _order_key(r)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.training.prompts",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, default=None,
                        help="held-out documents written by `python -m workbench.training "
                             "prepare` (default: CORPUS/heldout.jsonl, else "
                             "build/docs/heldout.jsonl)")
    parser.add_argument("--corpus", type=Path, default=Path("build/corpus"),
                        help="the prepared corpus: meta.json is copied, heldout.npy checked "
                             "against the text (default: %(default)s)")
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    if args.docs is None:
        candidates = (args.corpus / "heldout.jsonl", Path("build/docs/heldout.jsonl"))
        args.docs = next((p for p in candidates if p.is_file()), candidates[0])
    if not args.docs.is_file():
        raise SystemExit(f"{args.docs} not found: run `python -m workbench.training prepare`")
    with args.docs.open(encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    tokenizer = Tokenizer.from_file(str(DATA_DIR / "models" / BUNDLED_MODEL / "tokenizer.json"))

    records = build_prompts(docs, tokenizer)
    PROMPTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with PROMPTS_FILE.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {k: sum(r["kind"] == k for r in records) for k in KINDS}
    print(f"{PROMPTS_FILE}: {len(records)} prompts {counts}")

    text = "".join(d["text"] + EOS_TEXT for d in docs)
    HELDOUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(HELDOUT_FILE, "wb") as raw:  # mtime 0: the same input gives the same bytes
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
            f.write(text.encode("utf-8"))
    ids = tokenizer.encode(text).ids
    print(f"{HELDOUT_FILE}: {len(docs)} documents, {len(text):,} characters, {len(ids):,} tokens")
    tokens = args.corpus / "heldout.npy"
    if tokens.is_file():
        import numpy as np

        same = ids == np.load(tokens).tolist()
        print(f"matches {tokens} token for token: {same}")
        if not same:
            raise SystemExit("the held-out text does not reproduce the held-out tokens")

    meta_file = args.corpus / "meta.json"
    if not meta_file.is_file():
        raise SystemExit(f"{meta_file} not found: run `python -m workbench.training prepare`")
    meta = json.loads(meta_file.read_text())
    meta.pop("stdlib_root", None)  # a path on the build machine, meaningless elsewhere
    meta["held_out_characters"] = len(text)
    meta["held_out_docs"] = [[d["path"], d["name"]] for d in docs]
    CORPUS_FILE.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{CORPUS_FILE}: {len(meta['held_out_files'])} held-out files")


if __name__ == "__main__":
    main()
