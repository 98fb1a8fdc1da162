"""Hugging Face transformers as the peer of our engines: static ``generate``, continuous batching.

Both peers take the same :class:`Request` list as our engines and return one :class:`RequestTrace`
per request, in the order given. Decoding is greedy. Times are seconds after the run start ``t0``
(a ``time.perf_counter()`` value: passed in, or taken after set-up and warm-up). ``output_ids``
are a request's *useful* tokens: at most its own ``max_new_tokens`` and, unless ``ignore_eos``,
cut after its first EOS (kept; ``finish_reason="eos"``). Both peers time every token
(``token_times``: a streamer stamps each static step; continuous batching's ``record_timestamps``).
``scheduled_s`` is when a request's static batch starts / when it leaves continuous batching's
waiting queue; ``finish_s`` is its last useful token / when continuous batching finishes it.

Both run on CPU and GPU (continuous batching: ``sdpa``/``eager`` over its paged cache). Notebook 02.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workbench.engine.requests import Request, RequestTrace
from workbench.errors import WorkbenchError
from workbench.model.loading import PRESET_PREFIX, resolve_model_dir


def load_hf_model(model: str | Path, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """A transformers causal LM in eval mode on ``device``: ``"bundled"``, a directory or a preset.

    ``"preset:NAME"`` builds the shape on ``device`` and copies in our ``random_model``'s weights
    (seed 0): both systems run literally the same numbers (the copy briefly holds them twice).
    """
    import transformers

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {dtype_key: dtype, "attn_implementation": attn_implementation}  # None: the default
    if str(model).startswith(PRESET_PREFIX):
        from workbench.model.presets import random_model

        ours = random_model(str(model).removeprefix(PRESET_PREFIX), device, dtype)
        raw = ours.config.to_hf_dict()
        config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
        try:  # random init is slow and the weights are overwritten next
            from transformers.initialization import no_init_weights as skip_init
        except ImportError:
            skip_init = contextlib.nullcontext
        with torch.device(device), skip_init():
            net = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        net.tie_weights()  # skip_init skips the tying too
        _copy_our_weights(ours, net)
    else:
        path = resolve_model_dir(model)
        try:
            net = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
        except (OSError, ValueError) as err:
            raise WorkbenchError(f"transformers cannot load {path}: {err}") from None
    return net.eval()


@torch.no_grad()
def _copy_our_weights(ours, net) -> None:
    """Copy our parameters (HF names without ``model.``) into the transformers model, by name."""
    theirs = dict(net.named_parameters())
    for name, p in ours.named_parameters():
        target = theirs.get(name if name == "lm_head.weight" else f"model.{name}")
        if target is None or target.shape != p.shape:
            raise WorkbenchError(f"preset weight {name} {tuple(p.shape)}: no match in transformers")
        target.copy_(p)


def _eos_set(eos: int | list[int] | None) -> set[int]:
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def _default_eos(hf_model, eos_token_id):
    """The EOS id(s) given, else those of the model's generation config, else of its config."""
    gen = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    return next((e for e in (eos_token_id, gen, hf_model.config.eos_token_id) if e is not None),
                None)


def _check(hf_model, requests: list[Request]) -> None:
    context = getattr(hf_model.config, "max_position_embeddings", None)
    for r in requests:
        if not r.prompt_ids:
            raise WorkbenchError(f"request {r.id}: empty prompt")
        if context and len(r.prompt_ids) + r.max_new_tokens > context:
            raise WorkbenchError(f"request {r.id}: prompt + max_new_tokens > context {context}")


def _useful(generated: list[int], r: Request, eos: set[int]) -> tuple[list[int], str]:
    """Cut to ``max_new_tokens`` and (unless ``ignore_eos``) after the first EOS."""
    out = generated[:r.max_new_tokens]
    if not r.ignore_eos:
        for k, t in enumerate(out):
            if t in eos:
                return out[:k + 1], "eos"
    return out, "length"


class _StepClock:
    """A streamer that stamps each step: ``put`` gets the rows' new tokens ([B]) on the host."""

    def __init__(self, t0: float):
        self.t0, self.times = t0, []

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 1:  # the prompt comes first, as [B, P]: not a step
            self.times.append(time.perf_counter() - self.t0)

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_static(hf_model, requests: list[Request], batch_size: int,
              device: torch.device | str | None = None, eos_token_id: int | list[int] | None = None,
              pad_token_id: int | None = None, progress: bool = False, warmup: bool = True,
              t0: float | None = None) -> list[RequestTrace]:
    """transformers ``generate`` over static batches: the naive peer of our static engine.

    Requests in arrival order form batches of ``batch_size``. A batch starts once its last member
    has arrived (we sleep until then), left-pads its prompts (``attention_mask`` marks the padding)
    and runs ``generate(do_sample=False, max_new_tokens=<largest of the batch>)``. EOS stops rows
    (and the batch, once every row stopped) unless a member has ``ignore_eos``: then
    ``eos_token_id=None`` runs every row to the batch's length and each is cut afterwards (the
    tokens up to a row's EOS are the same either way). ``warmup`` first runs the first batch for 2
    tokens, untimed. Token times come from a streamer (``_StepClock``), one stamp per step.
    """
    if batch_size < 1:
        raise WorkbenchError(f"batch_size must be >= 1, got {batch_size}")
    _check(hf_model, requests)
    device = torch.device(device) if device is not None else hf_model.device
    eos = _default_eos(hf_model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else min(_eos_set(eos) or {0})
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]

    def run(batch: list[int], new_tokens: int, clock: _StepClock | None) -> list[list[int]]:
        prompts = [list(requests[i].prompt_ids) for i in batch]
        P = max(map(len, prompts))
        ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)  # [B, P]
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
        stop = None if any(requests[i].ignore_eos for i in batch) else eos
        out = hf_model.generate(ids, attention_mask=mask, do_sample=False, num_beams=1,
                                max_new_tokens=new_tokens, eos_token_id=stop, pad_token_id=pad,
                                streamer=clock)  # [B, P + steps]
        return out[:, P:].tolist()  # generated ids only, pad after a row's EOS

    if warmup and batches:
        run(batches[0], 2, None)
    t0 = time.perf_counter() if t0 is None else t0
    traces: dict[int, RequestTrace] = {}
    for batch in tqdm(batches, disable=not progress, desc="transformers static batches"):
        time.sleep(max(0.0, max(requests[i].arrival_s for i in batch) - time.perf_counter() + t0))
        start, clock = time.perf_counter() - t0, _StepClock(t0)
        new_tokens = max(requests[i].max_new_tokens for i in batch)
        rows = run(batch, new_tokens, clock) if new_tokens > 0 else [[] for _ in batch]
        for i, generated in zip(batch, rows):
            r = requests[i]
            out, reason = _useful(generated, r, _eos_set(eos))
            if r.ignore_eos and len(out) < r.max_new_tokens:
                raise WorkbenchError("transformers generate stopped early despite "
                                     "eos_token_id=None: this version cannot ignore EOS")
            times = clock.times[:len(out)]
            traces[i] = RequestTrace(r.id, r.arrival_s, len(r.prompt_ids), out, times, start,
                                     times[-1] if times else start, reason)
    return [traces[i] for i in range(len(requests))]


def _named_params(fn) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _cb_config(requests: list[Request], on_cpu: bool, num_blocks: int | None,
               max_batch_tokens: int | None, page_size: int | None, prefix_sharing: bool,
               scheduler: str, extra: dict):
    """The ``ContinuousBatchingConfig``; fields this transformers version lacks are left out."""
    from transformers.generation import ContinuousBatchingConfig as Config

    known = _named_params(Config)
    if page_size is not None and "page_size" not in known:  # block_size in transformers <= 5.17
        extra = {"block_size": page_size} | extra
    fields = {"page_size": page_size, "num_blocks": num_blocks,
              "max_batch_tokens": max_batch_tokens, "scheduler_type": scheduler,
              "allow_block_sharing": prefix_sharing}
    if on_cpu:  # the default would reserve 60% of the host's RAM: size the cache to the workload
        block = (page_size or getattr(Config, "page_size", None)
                 or getattr(Config, "block_size", None) or 16)
        fields["num_blocks"] = num_blocks or sum(
            math.ceil((len(r.prompt_ids) + r.max_new_tokens) / block) + 1 for r in requests)
        fields["max_batch_tokens"] = max_batch_tokens or 512
    kwargs = {k: v for k, v in fields.items() if v is not None and k in known} | extra
    if set(kwargs) - known:
        raise WorkbenchError(f"transformers' ContinuousBatchingConfig has no {set(kwargs) - known}")
    return Config(**kwargs)


@torch.no_grad()  # not inference_mode: transformers' thread updates buffers made here in place
def hf_continuous(hf_model, requests: list[Request], device: torch.device | str | None = None,
                  eos_token_id: int | list[int] | None = None, num_blocks: int | None = None,
                  max_batch_tokens: int | None = None, page_size: int | None = None,
                  prefix_sharing: bool = False, scheduler: str = "fifo",
                  cb_options: dict | None = None, progress: bool = False, warmup: bool = True,
                  t0: float | None = None) -> list[RequestTrace]:
    """transformers' own continuous batching: the production-style peer of our continuous engine.

    Configured as ``ContinuousBatchingConfig(page_size, num_blocks, max_batch_tokens,
    scheduler_type=scheduler, allow_block_sharing=prefix_sharing, **cb_options)`` with a fresh
    ``GenerationConfig(do_sample=False, eos_token_id=...)``. ``None`` keeps transformers' default
    (on a GPU: cache sized from free memory) except on CPU, where the cache holds the whole
    workload and ``max_batch_tokens`` is 512. Prefix sharing is off: our engines have no prefix
    cache. Attention: ``sdpa``, ``eager`` or flash (transformers switches to flash if installed,
    unless ``cb_options={"auto_switch_to_flash": False}``); the model's is restored afterwards.

    ``init_continuous_batching`` builds the manager (``warmup`` captures CUDA graphs if they are
    used), ``start`` runs its loop in a background thread, each request is ``add_request``-ed at
    its ``arrival_s`` with its own ``max_new_tokens``, ``eos_token_id=-1`` (none) if
    ``ignore_eos``, and ``record_timestamps=True``; ``get_result`` collects finished ones. A request
    that transformers fails comes back with ``finish_reason="rejected"`` and its error.
    """
    from transformers import GenerationConfig

    _check(hf_model, requests)
    needed = ["eos_token_id", "max_new_tokens", "record_timestamps", "request_id"]
    try:
        from transformers.generation import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching import ContinuousBatchingManager as cbm
        ok = not set(needed) - _named_params(cbm.add_request)
    except ImportError:
        ok = False
    if not (ok and hasattr(hf_model, "init_continuous_batching")):
        raise WorkbenchError("this transformers version lacks the continuous-batching API used: "
                             f"ContinuousBatchingConfig, init_continuous_batching(), "
                             f"ContinuousBatchingManager.add_request({'=, '.join(needed)}=)")
    if device is not None and torch.device(device).type != hf_model.device.type:
        raise WorkbenchError(f"the model is on {hf_model.device}, not on {device}")
    if not requests:
        return []
    eos = _default_eos(hf_model, eos_token_id)
    cb_config = _cb_config(requests, hf_model.device.type == "cpu", num_blocks, max_batch_tokens,
                           page_size, prefix_sharing, scheduler, cb_options or {})
    generation = GenerationConfig(do_sample=False, eos_token_id=-1 if eos is None else eos,
                                  pad_token_id=min(_eos_set(eos) or {0}),
                                  max_new_tokens=max(r.max_new_tokens for r in requests))
    attn = hf_model.config._attn_implementation  # transformers may switch it (paged, flash)
    manager = hf_model.init_continuous_batching(generation_config=generation,
                                                continuous_batching_config=cb_config)
    results, waiting = {}, sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    bar = tqdm(total=len(requests), disable=not progress, desc="transformers continuous")
    try:
        if warmup and hasattr(manager, "warmup"):
            manager.warmup()
        manager.start()
        t0 = time.perf_counter() if t0 is None else t0
        while len(results) < len(requests):
            now = time.perf_counter() - t0
            while waiting and requests[waiting[0]].arrival_s <= now:
                r = requests[(i := waiting.pop(0))]
                manager.add_request(input_ids=list(r.prompt_ids), request_id=f"wb{i}",
                                    max_new_tokens=r.max_new_tokens, record_timestamps=True,
                                    eos_token_id=-1 if r.ignore_eos or eos is None else eos)
            wait = requests[waiting[0]].arrival_s - now if waiting else 0.5
            out = manager.get_result(timeout=min(0.5, max(1e-3, wait)))
            if out is None and not manager.is_running():
                status = getattr(manager, "background_thread_status", None)
                raise WorkbenchError("transformers' continuous batching thread stopped: "
                                     f"{getattr(status, 'fatal_error', None)}")
            if out is not None and out.is_finished():
                results[int(out.request_id.removeprefix("wb"))] = out
                bar.update(1)
    finally:
        bar.close()
        manager.stop(block=True, timeout=30)
        if hasattr(manager, "destroy"):
            manager.destroy()
        if hf_model.config._attn_implementation != attn:  # versions before 5.2x keep "paged|..."
            hf_model.set_attn_implementation(attn)
    return [_cb_trace(requests[i], results[i], t0, _eos_set(eos)) for i in range(len(requests))]


def _cb_trace(r: Request, out, t0: float, eos: set[int]) -> RequestTrace:
    """One transformers ``GenerationOutput`` as a trace (its clock is ``time.perf_counter`` too)."""
    out_ids, reason = _useful(list(out.generated_tokens), r, eos)
    stamps = getattr(out, "timestamps", None) or []  # absent: token_times stays empty
    start, end = getattr(out, "lifespan", (-1, -1))
    trace = RequestTrace(r.id, r.arrival_s, len(r.prompt_ids), out_ids,
                         [s - t0 for s in stamps[:len(out_ids)]],
                         start - t0 if start > 0 else None, end - t0 if end > 0 else None, reason)
    if getattr(out, "error", None) is not None:
        trace.finish_reason, trace.error = "rejected", str(out.error)
    return trace


@torch.inference_mode()
def hf_generate_timed(hf_model, prompt_ids: tuple[int, ...] | list[int], new_tokens: int,
                      device: torch.device | str | None = None) -> float:
    """Batch-1 decode speed of ``generate`` (tok/s): ``new_tokens`` minus one token, over the
    time between the first and the last generated token (a streamer stamps each)."""
    device = torch.device(device or next(hf_model.parameters()).device)
    ids = torch.tensor([list(prompt_ids)], device=device)
    stamps: list[float] = []

    class _Stamp:
        def put(self, value: torch.Tensor) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, streamer=_Stamp(),
                      pad_token_id=0)
    # the streamer's first put() is the prompt, then one per generated token
    return (len(stamps) - 2) / (stamps[-1] - stamps[1])
