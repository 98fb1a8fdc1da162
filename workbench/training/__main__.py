"""Build the bundled model: ``python -m workbench.training prepare|train``.

    prepare --out build/corpus          corpus from this Python's stdlib, tokenizer, token arrays
    train --data build/corpus --out build/model --device cuda [--steps N]

``train`` copies the tokenizer next to the checkpoint, so ``--out`` is a complete model directory.
The model card (``workbench.training.card``) is written afterwards from the saved training log.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from workbench.training.corpus import build_corpus, write_jsonl
from workbench.training.tokenizer import EOS, save_tokenizer, train_tokenizer
from workbench.training.train import TrainConfig, train

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def prepare(out: Path, vocab_size: int, context: int) -> None:
    train_docs, held_docs, manifest = build_corpus()
    tok = train_tokenizer((d.text for d in train_docs), vocab_size)
    save_tokenizer(tok, out, model_max_length=context)
    eos_id = tok.token_to_id(EOS)
    for name, docs in (("train", train_docs), ("heldout", held_docs)):
        ids = [e.ids + [eos_id] for e in tok.encode_batch([d.text for d in docs])]
        np.save(out / f"{name}.npy", np.concatenate(ids).astype(np.uint16))
        manifest[f"{name}_tokens"] = sum(map(len, ids))
        write_jsonl(docs, out / f"{name}.jsonl")
    manifest |= {"vocab_size": tok.get_vocab_size(), "eos_id": eos_id}
    (out / "meta.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print({k: v for k, v in manifest.items() if k != "held_out_files"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=Path("build/corpus"))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--context", type=int, default=1024)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, default=Path("build/corpus"))
    t.add_argument("--out", type=Path, default=Path("build/model"))
    t.add_argument("--device", default="cuda")
    for field in ("steps", "batch_size", "context", "eval_every", "eval_windows"):
        t.add_argument(f"--{field.replace('_', '-')}", type=int,
                       default=TrainConfig.__dataclass_fields__[field].default)
    t.add_argument("--lr", type=float, default=TrainConfig.lr)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        args.out.mkdir(parents=True, exist_ok=True)
        prepare(args.out, args.vocab_size, args.context)
    else:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, context=args.context,
                          eval_every=args.eval_every, eval_windows=args.eval_windows, lr=args.lr)
        args.out.mkdir(parents=True, exist_ok=True)
        log = train(args.data, args.out, cfg, device=args.device)
        for name in TOKENIZER_FILES:
            shutil.copy(args.data / name, args.out / name)
        print(json.dumps({"best": log.get("best"), "seconds": log["seconds"],
                          "device": log["device"]}))


if __name__ == "__main__":
    main()
