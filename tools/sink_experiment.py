"""Does the bundled model's recipe grow attention sinks if it trains longer? (issue 7, notebook 08)

    python tools/sink_experiment.py prepare --out build/sinks-corpus          # here (CPU)
    python tools/sink_experiment.py run --data build/sinks-corpus --out $OUT --steps 4000   # GPU
    ... extend --extra-root SITE_PACKAGES --out build/big; run --data build/big ...   # more (third-party) Python
    ... run ... --align-documents        # every training window starts with end-of-text (like BOS)

``prepare`` tokenizes this Python's standard library (the bundled model's corpus and held-out rule)
with the bundled tokenizer. ``run`` trains the bundled model's shape with its recipe
(``workbench.training``) for ``--steps`` steps, keeping the best checkpoint (early stopping, what
the bundled model is) and the last one, then measures each: held-out loss, the attention that
queries put on the first 4 tokens (``workbench.streaming.probe``; uniform attention would give
0.046 for queries 16-255 of a 256-token window, ``probe.uniform_share``), and the perplexity of
window attention without sinks against sinks + window and recomputation on a held-out stream
(``workbench.streaming.score``). StreamingLLM's window baseline collapses only in models that put a
large share of attention on the first tokens. ``extend`` adds
the Python files under a folder (e.g. the GPU machine's site-packages, tokenized there) to the
training tokens, to see whether more data grows sinks; the held-out stream stays the stdlib's.

Findings (bench/results/sink-experiment-*_h200_2026-12-04.json, docs/notes/parallel-and-streaming-gpu.md):
the stdlib alone grows no sinks (it overfits after ~1,000 steps); with ~65 M more tokens of third-party
code, 4,000 steps grow them, and that checkpoint (``run --steps 4000 --keep-model`` on an ``extend``ed
corpus) ships as data/models/stdlib-llama-7m-sinks ("bundled-sinks") for notebook 08.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.model.loading import load_model, resolve_model_dir  # noqa: E402
from workbench.model import load_tokenizer  # noqa: E402
from workbench.streaming.score import long_stream  # noqa: E402

from workbench.training.__main__ import TOKENIZER_FILES  # noqa: E402
from workbench.training.tokenizer import EOS  # noqa: E402


def encode(texts: list[str]) -> np.ndarray:
    """Token ids of ``texts`` with the bundled tokenizer, each text ending in EOS (uint16)."""
    tok = load_tokenizer("bundled")
    eos = tok.convert_tokens_to_ids(EOS)
    return np.concatenate([ids + [eos] for ids in tok(texts, verbose=False)["input_ids"]]
                          ).astype(np.uint16)


def prepare(out: Path) -> None:
    from workbench.training.corpus import build_corpus

    tok = load_tokenizer("bundled")
    train_docs, held_docs, manifest = build_corpus()
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train_docs), ("heldout", held_docs)):
        ids = encode([d.text for d in docs])
        np.save(out / f"{name}.npy", ids)
        manifest[f"{name}_tokens"] = len(ids)
    manifest |= {"vocab_size": len(tok), "eos_id": tok.convert_tokens_to_ids(EOS)}
    (out / "meta.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print({k: v for k, v in manifest.items() if k != "held_out_files"})


@torch.inference_mode()
def measure(model_dir: Path, device: str) -> dict:
    """Sink shares and window/sinks/recompute perplexities of a checkpoint, on the held-out stream
    as it is and on the same stream after one end-of-text token (as a BOS-using model sees text)."""
    tok = load_tokenizer("bundled")
    model = load_model(model_dir, device, torch.float32)
    stream = long_stream(tok, 8192)
    eos = torch.tensor([tok.convert_tokens_to_ids(EOS)])
    return {"stream": measure_stream(model, stream),
            "eos_first": measure_stream(model, torch.cat([eos, stream[:-1]]))}


def measure_stream(model, ids: torch.Tensor) -> dict:
    from workbench.streaming.probe import attention_maps, sink_share, uniform_share
    from workbench.streaming.score import StreamEval, score_stream, window_over_sinks

    share = sink_share(attention_maps(model, ids[:256]), sinks=4)  # [L, H]
    spec = StreamEval(window=256, sinks=4, chunk=128, recompute_every=8)
    scores = {m: score_stream(model, ids, m, spec) for m in ("window", "sinks", "recompute")}
    where = scores["recompute"].evaluated
    ref = scores["recompute"].ppl(where=where)
    return {"layer_sink_share_mean": share.mean(1).tolist(), "max_head_sink_share": float(share.max()),
            "uniform_share": uniform_share(256, 4),
            "ppl": {m: s.ppl(where=where) for m, s in scores.items()},
            "sinks_over_recompute": scores["sinks"].ppl(where=where) / ref,
            "window_over_sinks_after_first_window": window_over_sinks(scores["window"],
                                                                      scores["sinks"], 256)}


def extra_tokens(root: Path, max_chars: int, data: Path, into: Path) -> dict:
    """``data``'s corpus plus the .py files under ``root`` (up to ``max_chars`` characters, files in
    sorted order, each ending in EOS) as a new corpus folder ``into``."""
    texts, chars = [], 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > 2_000_000:
            continue
        texts.append(text)
        chars += len(text)
        if chars >= max_chars:
            break
    extra, stdlib = encode(texts), np.load(data / "train.npy")
    into.mkdir(parents=True, exist_ok=True)
    np.save(into / "train.npy", np.concatenate([stdlib, extra]))
    shutil.copy(data / "heldout.npy", into / "heldout.npy")
    shutil.copy(data / "meta.json", into / "meta.json")
    return {"extra_root": str(root), "extra_files": len(texts), "extra_chars": chars,
            "extra_tokens": len(extra), "stdlib_train_tokens": len(stdlib)}


def run(data: Path, out: Path, steps: int, device: str, skip_bundled: bool = False,
        align_documents: bool = False, weight_decay: float = 0.1, keep_model: bool = False) -> None:
    from workbench.training.train import TrainConfig, train

    model_dir = out / "model"
    extra = data / "extra.json"  # a corpus made by ``extend``
    corpus = json.loads(extra.read_text()) if extra.exists() else {}
    cfg = TrainConfig(steps=steps, eval_every=250, align_documents=align_documents,
                      weight_decay=weight_decay)
    log = train(data, model_dir, cfg, device, progress=False, keep_last=True)
    bundled = resolve_model_dir("bundled")
    for d in (model_dir, model_dir / "last"):
        for name in TOKENIZER_FILES:
            shutil.copy(bundled / name, d / name)
    result = {"steps": steps, "align_documents": align_documents, "weight_decay": weight_decay,
              "best": log["best"], "eval": log["eval"], "seconds": log["seconds"],
              "device": log["device"], "corpus": corpus}
    checkpoints = [("best", model_dir), ("last", model_dir / "last")]
    for name, d in checkpoints + ([] if skip_bundled else [("bundled", bundled)]):
        result[name + "_measured"] = measure(d, device)
        print(name, json.dumps(result[name + "_measured"], indent=1), flush=True)
    (out / "sink-experiment.json").write_text(json.dumps(result, indent=1) + "\n")
    if keep_model:  # the best checkpoint comes back (bf16, 14 MB); the last one stays there
        shutil.rmtree(model_dir / "last")
    else:
        shutil.rmtree(model_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=Path("build/sinks-corpus"))
    e = sub.add_parser("extend", help="a corpus folder: --data's tokens plus the .py files under "
                       "--extra-root (for several runs to share)")
    e.add_argument("--data", type=Path, default=Path("build/sinks-corpus"))
    e.add_argument("--extra-root", type=Path, required=True)
    e.add_argument("--extra-chars", type=int, default=200_000_000)
    e.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, default=Path("build/sinks-corpus"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--steps", type=int, default=4000)
    r.add_argument("--device", default="cuda")
    r.add_argument("--skip-bundled", action="store_true")
    r.add_argument("--align-documents", action="store_true",
                   help="start every training window at an end-of-text token (TrainConfig)")
    r.add_argument("--weight-decay", type=float, default=0.1)
    r.add_argument("--keep-model", action="store_true", help="leave the best checkpoint in --out")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    elif args.command == "extend":
        info = extra_tokens(args.extra_root, args.extra_chars, args.data, args.out)
        (args.out / "extra.json").write_text(json.dumps(info, indent=1) + "\n")
        print(info)
    else:
        run(args.data, args.out, args.steps, args.device, args.skip_bundled, args.align_documents,
            args.weight_decay, args.keep_model)
