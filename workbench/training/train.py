"""Train the bundled model: a small Llama on the standard library corpus, best checkpoint kept.

The corpus is small for the model (it overfits after ~15 epochs, see ``shared`` calibration notes),
so held-out loss is measured every ``eval_every`` steps and the best checkpoint is the one saved
(early stopping). Runs on a GPU in minutes (bf16 autocast) and on a CPU, slower.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig
from workbench.model.llama import LlamaModel
from workbench.model.loading import save_checkpoint


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    context: int = 1024
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_windows: int = 64
    seed: int = 0
    # Start every training window at a document: its first token is the end-of-text token that ends
    # the document before (the role BOS plays in Llama), so position 0 always holds one fixed token.
    # Off for the bundled model (windows start anywhere); see tools/sink_experiment.py for why on.
    align_documents: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.context < 2:
            raise ValueError("steps, batch_size must be >= 1 and context >= 2")


def bundled_model_config(vocab_size: int, eos_id: int, context: int = 1024) -> ModelConfig:
    """The bundled model's shape: 6 layers, hidden 256, 8 query / 4 KV heads, tied embeddings."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=32, max_position_embeddings=context, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=True, eos_token_ids=(eos_id,),
                       pad_token_id=eos_id)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def window_starts(tokens: np.ndarray, length: int, eos_id: int | None) -> np.ndarray | None:
    """Where a training window of ``length`` tokens may start: at every end-of-text token with
    ``length`` tokens after it, or None for anywhere (``eos_id`` None)."""
    if eos_id is None:
        return None
    starts = np.flatnonzero(np.asarray(tokens[:len(tokens) - length]) == eos_id)
    if len(starts) == 0:
        raise ValueError(f"align_documents: no end-of-text token (id {eos_id}) with {length} "
                         "tokens after it in the training data")
    return starts


def windows(tokens: np.ndarray, starts: np.ndarray, length: int, device) -> torch.Tensor:
    """Token windows [N, length] starting at ``starts``."""
    rows = np.stack([tokens[s:s + length] for s in starts]).astype(np.int64)
    return torch.from_numpy(rows).to(device, non_blocking=True)


def loss_of(model: LlamaModel, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of rows [B, T+1]."""
    logits = model(ForwardBatch.prefill(rows[:, :-1]))  # [B, T, vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: LlamaModel, held: torch.Tensor, batch_size: int, autocast) -> float:
    model.eval()
    losses = []
    for i in range(0, len(held), batch_size):
        with autocast:
            losses.append(loss_of(model, held[i:i + batch_size]).item())
    model.train()
    return float(np.mean(losses))


def train(data_dir: Path, out_dir: Path, cfg: TrainConfig, device: str = "cuda",
          progress: bool = True, keep_last: bool = False) -> dict:
    """Train on ``data_dir/{train,heldout}.npy``; save the best checkpoint to ``out_dir`` (and,
    with ``keep_last``, the weights of the last step to ``out_dir / "last"``)."""
    from tqdm.auto import tqdm

    meta = json.loads((data_dir / "meta.json").read_text())
    train_tokens = np.load(data_dir / "train.npy", mmap_mode="r")
    held_tokens = np.load(data_dir / "heldout.npy", mmap_mode="r")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model_cfg = bundled_model_config(meta["vocab_size"], meta["eos_id"], cfg.context)
    model = LlamaModel(model_cfg)
    for name, p in model.named_parameters():  # GPT-2 style init
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=device.startswith("cuda"))
    n_held = min(cfg.eval_windows, max(1, (len(held_tokens) - 1) // (cfg.context + 1)))
    held_starts = np.arange(n_held) * (cfg.context + 1)
    held = windows(held_tokens, held_starts, cfg.context + 1, device)
    aligned = window_starts(train_tokens, cfg.context + 1,
                            meta["eos_id"] if cfg.align_documents else None)
    log = {"train": [], "eval": [], "config": asdict(cfg), "model": model_cfg.to_hf_dict(),
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "parameters": sum(p.numel() for p in model.parameters())}
    best, best_state, t0 = float("inf"), None, time.time()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="training")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        if aligned is None:
            starts = rng.integers(0, len(train_tokens) - cfg.context - 1, cfg.batch_size)
        else:
            starts = aligned[rng.integers(0, len(aligned), cfg.batch_size)]
        rows = windows(train_tokens, starts, cfg.context + 1, device)
        with autocast:
            loss = loss_of(model, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            log["train"].append((step, loss.item()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            held_loss = evaluate(model, held, cfg.batch_size, autocast)
            log["eval"].append((step + 1, held_loss))
            bar.set_postfix(train=f"{loss.item():.3f}", held_out=f"{held_loss:.3f}")
            if held_loss < best:
                best = held_loss
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                              model.state_dict().items()}
                log["best"] = {"step": step + 1, "held_out_loss": held_loss}
    log["seconds"] = time.time() - t0
    if keep_last:
        save_checkpoint(model, out_dir / "last")
    model.load_state_dict(best_state)
    save_checkpoint(model, out_dir)
    (out_dir / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log
