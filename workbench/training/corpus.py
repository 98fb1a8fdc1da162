"""The bundled model's corpus: Python's standard library, one document per top-level definition.

Every top-level function and class of every ``.py`` file under the standard library (its test suite
included, where the interpreter ships it) becomes one document; documents are separated by the EOS
token, so the model learns where a definition ends and its generations stop on their own at varied
lengths. One file in 20, chosen by a stable hash of its path, is held out: its definitions never
reach training and give the rest of the project realistic prompts and held-out text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_EVERY = 20


@dataclass(frozen=True)
class Document:
    path: str  # relative to the standard library root
    name: str  # the function or class name
    text: str  # its source, decorators included


def is_held_out(rel_path: str) -> bool:
    """Stable 1-in-20 split by the SHA-1 of the relative path (same on every machine)."""
    return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """Every ``.py`` file of the standard library, without third-party site-packages."""
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def documents_of(source: str, rel_path: str) -> list[Document]:
    """Top-level functions and classes of one file as documents (nothing if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    docs = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            text = "\n".join(lines[first - 1:node.end_lineno]).rstrip()
            if text:
                docs.append(Document(rel_path, node.name, text))
    return docs


def build_corpus(root: Path | None = None) -> tuple[list[Document], list[Document], dict]:
    """(train documents, held-out documents, manifest) from the standard library at ``root``."""
    root = root or stdlib_root()
    train, held = [], []
    held_files = []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs = documents_of(source, rel)
        if is_held_out(rel):
            held.extend(docs)
            if docs:
                held_files.append(rel)
        else:
            train.extend(docs)
    manifest = {
        "python_version": sys.version.split()[0],
        "stdlib_root": str(root),
        "train_documents": len(train),
        "held_out_documents": len(held),
        "held_out_files": held_files,
        "held_out_rule": f"sha1(relative path) % {HELD_OUT_EVERY} == 0",
    }
    return train, held, manifest


def write_jsonl(docs: list[Document], path: Path) -> None:
    with path.open("w") as f:
        for d in docs:
            f.write(json.dumps({"path": d.path, "name": d.name, "text": d.text}) + "\n")


def read_jsonl(path: Path) -> list[Document]:
    with path.open() as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]
