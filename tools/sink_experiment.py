"""Does the bundled model's recipe grow attention sinks if it trains longer? (issue 7, notebook 08)

    python tools/sink_experiment.py prepare --out build/sinks-corpus          # here (CPU)
    python tools/sink_experiment.py run --data build/sinks-corpus --out $OUT --steps 4000   # GPU

``prepare`` tokenizes this Python's standard library (the bundled model's corpus and held-out rule)
with the bundled tokenizer. ``run`` trains the bundled model's shape with its recipe
(``workbench.training``) for ``--steps`` steps, keeping the best checkpoint (early stopping, what
the bundled model is) and the last one, then measures each: held-out loss, the attention that
queries put on the first 4 tokens (``workbench.streaming.probe``; uniform attention would give
about 0.03), and the perplexity of window attention without sinks against sinks + window and
recomputation on a held-out stream (``workbench.streaming.score``). StreamingLLM's window baseline
collapses only in models that put a large share of attention on the first tokens.
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

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def prepare(out: Path) -> None:
    from workbench.training.corpus import build_corpus

    tok = load_tokenizer("bundled")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    train_docs, held_docs, manifest = build_corpus()
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train_docs), ("heldout", held_docs)):
        ids = [tok(d.text, verbose=False)["input_ids"] + [eos] for d in docs]
        np.save(out / f"{name}.npy", np.concatenate(ids).astype(np.uint16))
        manifest[f"{name}_tokens"] = sum(map(len, ids))
    manifest |= {"vocab_size": len(tok), "eos_id": eos}
    (out / "meta.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print({k: v for k, v in manifest.items() if k != "held_out_files"})


@torch.inference_mode()
def measure(model_dir: Path, device: str) -> dict:
    from workbench.streaming.probe import attention_maps, sink_share, uniform_share
    from workbench.streaming.score import StreamEval, long_stream, score_stream

    model = load_model(model_dir, device, torch.float32)
    tok = load_tokenizer("bundled")
    ids = long_stream(tok, 8192)
    share = sink_share(attention_maps(model, ids[:256]), sinks=4)  # [L, H]
    spec = StreamEval(window=256, sinks=4, chunk=128, recompute_every=8)
    scores = {m: score_stream(model, ids, m, spec) for m in ("window", "sinks", "recompute")}
    where = scores["recompute"].evaluated
    ref = scores["recompute"].ppl(where=where)
    return {"layer_sink_share_mean": share.mean(1).tolist(), "max_head_sink_share": float(share.max()),
            "uniform_share": uniform_share(256, 4),
            "ppl": {m: s.ppl(where=where) for m, s in scores.items()},
            "sinks_over_recompute": scores["sinks"].ppl(where=where) / ref,
            "window_over_sinks_after_first_window": scores["window"].ppl(256) / scores["sinks"].ppl(256)}


def run(data: Path, out: Path, steps: int, device: str) -> None:
    from workbench.training.train import TrainConfig, train

    model_dir = out / "model"
    log = train(data, model_dir, TrainConfig(steps=steps, eval_every=250), device, progress=False,
                keep_last=True)
    bundled = resolve_model_dir("bundled")
    for d in (model_dir, model_dir / "last"):
        for name in TOKENIZER_FILES:
            shutil.copy(bundled / name, d / name)
    result = {"steps": steps, "best": log["best"], "eval": log["eval"], "seconds": log["seconds"],
              "device": log["device"]}
    for name, d in (("best", model_dir), ("last", model_dir / "last"), ("bundled", bundled)):
        result[name + "_measured"] = measure(d, device)
        print(name, json.dumps(result[name + "_measured"], indent=1), flush=True)
    (out / "sink-experiment.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(model_dir)  # checkpoints stay on the GPU machine; the JSON comes back


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=Path("build/sinks-corpus"))
    r = sub.add_parser("run")
    r.add_argument("--data", type=Path, default=Path("build/sinks-corpus"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--steps", type=int, default=4000)
    r.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out)
    else:
        run(args.data, args.out, args.steps, args.device)
