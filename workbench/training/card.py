"""Write the bundled model's card: ``python -m workbench.training.card``.

Reads ``config.json`` and ``training_log.json`` of ``data/models/stdlib-llama-7m``, the corpus
manifest ``data/heldout/corpus.json`` and the held-out prompts (``workbench.training.prompts``),
then

* draws ``loss.png``: training and held-out loss against step, the kept (best) step marked;
* generates sample completions with the workbench's own engine on the CPU: greedy completions of a
  few hand-written prompts, sampled completions of held-out prompts, and the output-length
  distribution of 64 sampled held-out prompts (the lengths the batching notebooks work with);
* with ``--check-loss``, recomputes the held-out loss of the shipped bf16 weights on the CPU, on
  the training run's evaluation windows;
* writes ``README.md``, a Hugging Face model card (YAML front matter, then Markdown).

Every number in the card is computed here from those files or from the generations, so the card is
re-written, never edited by hand. Generated text is shown exactly as decoded. Runs in a few minutes
on a laptop CPU (most of it the 64 sampled generations of up to 512 tokens); ``--prompts`` and
``--max-new-tokens`` trade the length statistics for speed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.model.loading import BUNDLED_MODEL, DATA_DIR

MODEL_DIR = DATA_DIR / "models" / BUNDLED_MODEL

# Hand-picked prompts for the greedy samples, chosen from about twenty tried: a short function
# the model completes correctly, a bare signature it completes with plausible (made-up) code, and a
# class, where greedy decoding shows its typical failure, repeating itself until the token limit.
GREEDY_PROMPTS = (
    'def add(a, b):\n    """Return the sum of a and b."""',
    "def read_lines(path):",
    'class Point:\n    """A point in the plane."""',
)
GREEDY_MAX_NEW_TOKENS = 128
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=0)
SHOWN_SAMPLES = 5

# The run before the final recipe (kept for the card: its log is not shipped).
EARLIER_RUN = {"steps": 3000, "best_step": 800, "best_loss": 2.884, "final_loss": 3.69}


@dataclass
class Completion:
    prompt: str
    text: str  # the generated text only, EOS not shown
    tokens: int  # generated tokens, the final EOS included
    finish_reason: str  # "eos" or "length"
    source: str = ""


# ----------------------------------------------------------------------------------- inputs


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


# ----------------------------------------------------------------------------------- plot


def plot_loss(log: dict, out: Path) -> None:
    """Training loss (every logged step) and held-out loss (every evaluation), best step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_steps, train_loss = zip(*log["train"])
    eval_steps, eval_loss = zip(*log["eval"])
    best = log["best"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(train_steps, train_loss, color="C0", lw=1.2, label="training loss (one batch)")
    ax.plot(eval_steps, eval_loss, "o-", color="C1", ms=3.5, lw=1.5,
            label=f"held-out loss ({log['config']['eval_windows']} windows)")
    ax.axvline(best["step"], color="grey", ls=":", lw=1)
    ax.plot([best["step"]], [best["held_out_loss"]], "*", color="C3", ms=12, zorder=5,
            label=f"kept: step {best['step']}, {best['held_out_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_ylim(0, math.ceil(max(train_loss)))
    ax.set_xlim(0, log["config"]["steps"])
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title(f"{BUNDLED_MODEL}: {log['config']['steps']} steps on one {log['device']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- model runs


def generate(model, tok, prompts: list[str], max_new_tokens: int, sampling,
             batch_size: int) -> list[Completion]:
    from workbench.engine import generate_static

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    run = generate_static(model, ids, max_new_tokens, batch_size=batch_size, sampling=sampling)
    return [Completion(p, tok.decode(o.output_ids, skip_special_tokens=True), len(o.output_ids),
                       o.finish_reason) for p, o in zip(prompts, run.outputs)]


@torch.inference_mode()
def heldout_loss(model, tok, cfg: dict) -> float:
    """Mean next-token loss over the training run's evaluation windows: the first
    ``eval_windows`` consecutive windows of ``context + 1`` tokens of the held-out stream."""
    from workbench.model import ForwardBatch
    from workbench.training.prompts import load_heldout_text

    n, length = cfg["eval_windows"], cfg["context"] + 1
    ids = tok.backend_tokenizer.encode(load_heldout_text()).ids[:n * length]
    rows = torch.tensor(ids).view(-1, length)
    losses = []
    for batch in rows.split(8):
        logits = model(ForwardBatch.prefill(batch[:, :-1]))
        losses.append(torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item())
    return sum(losses) / (rows.shape[0] * (length - 1))


def length_stats(lengths: list[int], reasons: list[str], cap: int) -> dict:
    """Statistics of the output lengths had generation stopped at ``cap`` tokens (same samples:
    a request's tokens do not depend on its limit)."""
    capped = [min(n, cap) for n in lengths]
    eos = [n <= cap and r == "eos" for n, r in zip(lengths, reasons)]
    q = statistics.quantiles(capped, n=4)
    return {"cap": cap, "n": len(capped), "min": min(capped), "p25": q[0],
            "median": statistics.median(capped), "p75": q[2], "mean": statistics.fmean(capped),
            "max": max(capped), "eos": sum(eos) / len(eos),
            "eos_lengths": sorted(n for n, e in zip(lengths, eos) if e)}


# ----------------------------------------------------------------------------------- markdown


def code_block(text: str, lang: str = "python") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text}\n{fence}"


def describe(c: Completion, limit: int) -> str:
    end = ("ended by EOS" if c.finish_reason == "eos"
           else f"stopped by the {limit}-token limit, no EOS")
    return f"{c.tokens} generated tokens, {end}"


def fmt(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def reproduce_flags(log_cfg: dict) -> str:
    """``train`` flags that reproduce ``log_cfg`` with the current defaults of TrainConfig."""
    from workbench.training.train import TrainConfig

    flags = []
    for name in ("steps", "batch_size", "context", "eval_every", "eval_windows", "lr"):
        default = TrainConfig.__dataclass_fields__[name].default
        if name in log_cfg and log_cfg[name] != default:
            flags.append(f"--{name.replace('_', '-')} {log_cfg[name]:g}")
    return " ".join(flags)


def render(*, config: dict, log: dict, corpus: dict, params: int, cpu_loss: float | None,
           greedy: list[Completion], samples: list[Completion], stats: list[dict],
           n_prompts: int, max_new_tokens: int) -> str:
    cfg, best = log["config"], log["best"]
    ppl = math.exp(best["held_out_loss"])
    tokens_per_step = cfg["batch_size"] * cfg["context"]
    epochs = cfg["steps"] * tokens_per_step / corpus["train_tokens"]
    last_train = statistics.fmean(loss for _, loss in log["train"][-10:])
    final_eval = log["eval"][-1]
    n_files = len(corpus["held_out_files"])
    chars_per_token = corpus["held_out_characters"] / corpus["heldout_tokens"]
    full = stats[-1]
    kv_heads = config["num_key_value_heads"]
    q_heads = config["num_attention_heads"]
    embed = config["vocab_size"] * config["hidden_size"]
    L = []
    add = L.append

    add(f"""---
license: mit
library_name: workbench
language:
- code
pipeline_tag: text-generation
tags:
- llama
- python
- code
- tiny
- educational
- workbench
---

# {BUNDLED_MODEL}

A {params / 1e6:.1f}M-parameter Llama-architecture language model trained from scratch on the
standard library of Python {corpus['python_version']}. It is the model **bundled with workbench**,
the educational LLM-inference library: small enough that every notebook runs it on a laptop CPU in
seconds, real enough that it writes recognisable Python, stops on its own with an end-of-text token
and produces outputs of naturally varied length, which is what the batching, KV-cache and
scheduling experiments need.

It is a toy, **not a coding assistant**: it has seen {corpus['train_tokens'] / 1e6:.1f}M tokens of
one code base, knows no instructions, and its code is plausible-looking, rarely correct.

```python
from workbench.model import load_model, load_tokenizer
from workbench.engine import generate_static, SamplingParams

model, tok = load_model("bundled"), load_tokenizer("bundled")
prompt = 'def add(a, b):\\n    \"\"\"Return the sum of a and b.\"\"\"'  # no trailing newline!
run = generate_static(model, [tok(prompt)["input_ids"]], max_new_tokens=128)
print(prompt + tok.decode(run.outputs[0].output_ids, skip_special_tokens=True))
```

The directory is also a standard Hugging Face checkpoint (`LlamaForCausalLM`, `model.safetensors`,
`tokenizer.json`), so `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it too.

## Architecture

| | |
|---|---|
| type | decoder-only transformer, Llama layout (`{config['model_type']}`) |
| parameters | {params:,} ({embed:,} of them the embedding, tied with the output head) |
| layers | {config['num_hidden_layers']} |
| hidden size | {config['hidden_size']} |
| MLP | SwiGLU ({config['hidden_act']}), intermediate size {config['intermediate_size']} |
| attention | grouped-query: {q_heads} query heads, {kv_heads} key/value heads, head dim {config['head_dim']} |
| positions | RoPE, θ = {config['rope_theta']:g}, no scaling |
| context | {config['max_position_embeddings']:,} tokens |
| normalisation | RMSNorm, ε = {config['rms_norm_eps']:g} |
| vocabulary | {config['vocab_size']:,} tokens |
| tied embeddings | {str(config['tie_word_embeddings']).lower()} |
| biases | none |
| weights | {config.get('torch_dtype', 'bfloat16')}, `model.safetensors` |

KV cache per token: {2 * config['num_hidden_layers'] * kv_heads * config['head_dim']:,} values
(2 × {config['num_hidden_layers']} layers × {kv_heads} heads × {config['head_dim']}), i.e.
{2 * config['num_hidden_layers'] * kv_heads * config['head_dim'] * 2 / 1024:.0f} KiB in bf16 or
{2 * config['num_hidden_layers'] * kv_heads * config['head_dim'] * 4 / 1024:.0f} KiB in fp32.

## Tokenizer

Byte-level BPE (GPT-2's scheme: no unknown token, any text encodes) with a vocabulary of
{corpus['vocab_size']:,}, trained with the `tokenizers` library on the training documents only.
`<|endoftext|>` (id {corpus['eos_id']}) ends every document; it is also the padding token. There is
no BOS token: a prompt is encoded as it is. On the held-out text a token is
{chars_per_token:.2f} characters on average.

## Training data

The standard library of CPython {corpus['python_version']}, **its `test` package included**, every
`.py` file (third-party `site-packages` excluded):

- **document** = one top-level function or class of a file, decorators included, as written in the
  source; documents are joined with `<|endoftext|>` after each, so the model learns where a
  definition ends;
- **held-out split**: a whole file is held out when `{corpus['held_out_rule']}` on its path
  relative to the library root: about 1 file in 20, chosen by a stable hash, the same on every
  machine;
- **training**: {corpus['train_documents']:,} documents, {corpus['train_tokens']:,} tokens;
- **held out**: {corpus['held_out_documents']:,} documents from {n_files} files,
  {corpus['heldout_tokens']:,} tokens. The held-out text ships with workbench as
  `data/heldout/stdlib_heldout.txt.gz` and prompts cut from it as
  `data/prompts/heldout_prompts.jsonl` (see `workbench.training.prompts`).

<details>
<summary>The {n_files} held-out files</summary>

{chr(10).join(f"- `{f}`" for f in corpus['held_out_files'])}

</details>

## Training

| | |
|---|---|
| steps | {cfg['steps']:,}, batch {cfg['batch_size']} × {cfg['context']:,} tokens = {tokens_per_step:,} tokens / step |
| tokens seen | {cfg['steps'] * tokens_per_step / 1e6:.1f}M, about {epochs:.1f} passes over the training tokens |
| sampling | random windows of {cfg['context'] + 1:,} tokens from the concatenated training stream (across document boundaries) |
| optimizer | AdamW, β = (0.9, 0.95), weight decay {cfg['weight_decay']:g} on matrices only, gradient norm clipped at 1 |
| learning rate | {cfg['lr']:g}, linear warm-up {cfg['warmup']} steps, cosine decay to {cfg['min_lr']:g} |
| initialisation | normal, σ = 0.02 (GPT-2 style), seed {cfg['seed']} |
| precision | bf16 autocast, fp32 master weights; saved in bf16 |
| evaluation | every {cfg['eval_every']} steps, on the first {cfg['eval_windows']} consecutive {cfg['context'] + 1:,}-token windows of the held-out stream |
| checkpoint | the one with the lowest held-out loss (early stopping) |
| hardware | one {log['device']}, {log['seconds']:.1f} s of training |

## Results

| | |
|---|---|
| best held-out loss | **{best['held_out_loss']:.3f} nats / token** at step {best['step']} (the shipped weights) |
| held-out perplexity | **{ppl:.2f}** (= e^{best['held_out_loss']:.3f}) |
| held-out loss at the last step ({final_eval[0]:,}) | {final_eval[1]:.3f} |
| training loss, mean of the last 10 logged steps | {last_train:.3f} |""")
    if cpu_loss is not None:
        add(f"| shipped bf16 weights, run in fp32 on CPU, same windows | "
            f"{cpu_loss:.3f} (perplexity {math.exp(cpu_loss):.2f}) |")
    add(f"""
![training and held-out loss](loss.png)

The gap between training loss and held-out loss is large: the corpus is small for the model and it
memorises. An earlier run of the same recipe for {EARLIER_RUN['steps']:,} steps reached its best
held-out loss, {EARLIER_RUN['best_loss']:.3f}, at step {EARLIER_RUN['best_step']} and then
overfitted, held-out loss climbing to {EARLIER_RUN['final_loss']:.2f} by step
{EARLIER_RUN['steps']:,}; hence the final recipe: {cfg['steps']:,} steps (the cosine schedule ends
sooner) and the best checkpoint kept.

## Sample generations

Generated by `python -m workbench.training.card` with the workbench engine
(`workbench.engine.generate_static`) on the CPU, fp32. The text after the prompt is the model's,
unedited; EOS is not printed.

### Greedy, hand-written prompts

Chosen from about twenty prompts tried; most bare signatures fall into a repetition loop within a
few lines under greedy decoding, as the last one does. Limit: {GREEDY_MAX_NEW_TOKENS} new tokens.
""")
    for c in greedy:
        add(f"{describe(c, GREEDY_MAX_NEW_TOKENS)}:\n\n{code_block(c.prompt + c.text)}\n")
    add(f"""### Sampled, held-out prompts

The first {len(samples)} prompts of `load_prompts("signature+docstring")` (signatures and
docstrings from held-out files the model never saw), sampled with temperature
{SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, seed {SAMPLING['seed']}; limit
{max_new_tokens} new tokens. They are the first {len(samples)} requests of the length statistics
below.
""")
    for c in samples:
        block = code_block(c.prompt + c.text)
        if block.count("\n") > 40:
            add(f"<details>\n<summary><code>{c.source}</code>: {describe(c, max_new_tokens)} "
                f"(click to expand)</summary>\n\n{block}\n\n</details>\n")
        else:
            add(f"`{c.source}`: {describe(c, max_new_tokens)}:\n\n{block}\n")
    rows = "\n".join(
        f"| {s['cap']} | {s['min']} | {fmt(s['p25'])} | {fmt(s['median'])} | {fmt(s['p75'])} | "
        f"{s['mean']:.1f} | {s['max']} | {s['eos']:.0%} |" for s in stats)
    eos_lengths = full["eos_lengths"]
    add(f"""### Output lengths

The first {n_prompts} `signature+docstring` held-out prompts (`load_prompts("signature+docstring",
limit={n_prompts})`), sampled as above with `max_new_tokens={max_new_tokens}`: this is the natural
length distribution the batching notebooks work with.

- **min {full['min']}, median {fmt(full['median'])}, mean {full['mean']:.1f}, max {full['max']}
  tokens; {full['eos']:.0%} of the outputs end by EOS**, the rest run to the limit (usually in a
  repetition loop, or writing the rest of a class after a method).
- Lengths of the outputs that ended by EOS: {', '.join(map(str, eos_lengths))}.

A request's samples do not depend on its limit (each has its own seeded random stream), so the same
generations cut at smaller limits give:

| max_new_tokens | min | 25% | median | 75% | mean | max | ended by EOS |
|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

Lengths count generated tokens, the final EOS included.

## Limitations

- **A prompt must not end with a newline.** The byte-level BPE merges a newline with the
  indentation after it (`"\\n    return"` is `"\\n   "` + `" return"`), so a lone `"\\n"` token
  means that the next line starts at column 0; inside one top-level definition that almost only
  happens when the definition is over, and the model answers with EOS at once. End prompts with
  the `:` of a signature or the closing `\"\"\"` of a docstring.
- After a bare signature such as `def f(x):` the model often indents the body by 8 spaces, as in a
  method: most definitions it saw are methods of classes. A docstring in the prompt fixes the
  indentation.
- **Context: {config['max_position_embeddings']:,} tokens** (prompt plus output), the training
  window; RoPE is not scaled for longer sequences.
- Trained on the {corpus['python_version']} standard library including its tests: it writes test-suite-like code
  (`self.assertEqual(...)`, `unittest.TestCase` classes), stdlib idioms and made-up names; it knows
  nothing of third-party libraries or newer Python versions, and greedy decoding loops easily.
- Held-out loss was measured on {cfg['eval_windows']} windows ({cfg['eval_windows'] * cfg['context']:,}
  predicted tokens, the start of the held-out stream), not the whole held-out text.

## How to reproduce

With Python {corpus['python_version']} (another version's standard library gives another corpus)
and a CUDA GPU:

```bash
python -m workbench.training prepare --out build/corpus
python -m workbench.training train --data build/corpus --out build/model --device cuda {reproduce_flags(cfg)}
cp build/model/* data/models/{BUNDLED_MODEL}/
python -m workbench.training.prompts   # held-out text and prompts -> data/heldout, data/prompts
python -m workbench.training.card      # this card and loss.png
```

GPU training is not bit-for-bit deterministic, so a rerun gives a close but not identical model.

## License

- The **weights** and this card: MIT, like the workbench code.
- The **training corpus** (and the held-out text and prompts shipped with workbench) is the Python
  standard library, © Python Software Foundation, distributed under the
  [PSF License](https://docs.python.org/3/license.html).
""")
    return "\n".join(L)


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.training.card",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--prompts", type=int, default=64,
                        help="held-out prompts for the length statistics (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="limit of the sampled generations (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: %(default)s: the engine samples each "
                             "row with small tensor ops, which extra threads only slow down)")
    parser.add_argument("--check-loss", action="store_true",
                        help="also recompute the held-out loss of the shipped weights on the CPU "
                             "(a few more minutes) and add it to the card")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from workbench.engine import SamplingParams
    from workbench.model import load_model, load_tokenizer
    from workbench.training.prompts import load_corpus_info, load_prompt_records

    start = time.perf_counter()
    model_dir = args.model_dir
    config = read_json(model_dir / "config.json")
    log = read_json(model_dir / "training_log.json")
    corpus = load_corpus_info()
    params = count_parameters(model_dir)
    if "parameters" in log and log["parameters"] != params:
        raise SystemExit(f"training_log.json says {log['parameters']} parameters, "
                         f"the weights have {params}")

    plot_loss(log, model_dir / "loss.png")
    print(f"wrote {model_dir / 'loss.png'}")

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    t = time.perf_counter()
    greedy = generate(model, tok, list(GREEDY_PROMPTS), GREEDY_MAX_NEW_TOKENS, SamplingParams(),
                      batch_size=len(GREEDY_PROMPTS))
    print(f"greedy samples: {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    records = load_prompt_records("signature+docstring", limit=args.prompts)
    sampled = generate(model, tok, [r["prompt"] for r in records], args.max_new_tokens,
                       SamplingParams(**SAMPLING), batch_size=args.batch_size)
    for c, r in zip(sampled, records):
        c.source = r["source"]
    lengths = [c.tokens for c in sampled]
    reasons = [c.finish_reason for c in sampled]
    caps = [c for c in (128, 256) if c < args.max_new_tokens] + [args.max_new_tokens]
    stats = [length_stats(lengths, reasons, cap) for cap in caps]
    print(f"sampled {len(sampled)} held-out prompts: {time.perf_counter() - t:.1f} s; "
          + json.dumps({k: v for k, v in stats[-1].items() if k != "eos_lengths"}))

    cpu_loss = None
    if args.check_loss:
        t = time.perf_counter()
        cpu_loss = heldout_loss(model, tok, log["config"])
        print(f"held-out loss on CPU: {cpu_loss:.4f} ({time.perf_counter() - t:.1f} s)")

    card = render(config=config, log=log, corpus=corpus, params=params, cpu_loss=cpu_loss,
                  greedy=greedy, samples=sampled[:SHOWN_SAMPLES], stats=stats,
                  n_prompts=len(sampled), max_new_tokens=args.max_new_tokens)
    (model_dir / "README.md").write_text(card)
    print(f"wrote {model_dir / 'README.md'} ({len(card):,} characters) in "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
