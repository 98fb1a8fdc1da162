"""Hugging Face Accelerate's offloading, the row-by-row peer of our block schedule (notebook 06).

``infer_auto_device_map(max_memory=...)`` fills the GPU (or, on a CPU-only machine, RAM) with whole
decoder layers up to the budget and sends the rest to the CPU (then disk); ``dispatch_model`` puts
hooks on the offloaded modules that copy their weights in before each forward and drop them after.
Every batch therefore streams the offloaded layers once per forward, from pageable memory, without
overlapping copies and compute: the row-by-row schedule. We run ``generate`` (greedy, exactly
``max_new_tokens`` per row) on the same weights, prompts and budget as our offloaded model.

``max_memory`` is not a cap on Accelerate's peak: it bounds the weights placed on the device,
*including* room Accelerate reserves for the largest offloaded module in flight, but not the KV
cache, activations and logits of ``generate``. ``bench offload`` therefore gives it the budget minus
an estimate of those, measures the peak of a probe run and lowers ``max_memory`` (dispatching the
same CPU weights again, :func:`hf_from_state`) until the peak fits the budget.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import WorkbenchError

NO_SPLIT = ["LlamaDecoderLayer", "Qwen2DecoderLayer"]


@dataclass
class AccelerateRun:
    batch_size: int
    output_ids: list[list[int]]
    prefill_s: float  # until the first token
    decode_s: float  # first token -> last token
    peak_fast_bytes: int | None  # CUDA: peak allocated device memory during generate
    fast_bytes_at_start: int | None = None  # CUDA: allocated before (its resident weights)
    peak_reserved_bytes: int | None = None  # CUDA: peak reserved by the caching allocator
    step_s: list[float] | None = None  # every decode step (first token -> second, ...)

    @property
    def decode_tok_s(self) -> float:
        steps = len(self.output_ids[0]) - 1 if self.output_ids else 0
        return self.batch_size * steps / self.decode_s if steps and self.decode_s else 0.0

    @property
    def output_tok_s(self) -> float:
        total = sum(map(len, self.output_ids))
        return total / (self.prefill_s + self.decode_s)


def _skeleton(model_config, dtype: torch.dtype):
    """A transformers model of our config on the CPU, its weights allocated but not initialised."""
    import transformers

    raw = model_config.to_hf_dict()
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    try:
        from transformers.initialization import no_init_weights as skip_init
    except ImportError:
        skip_init = contextlib.nullcontext
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with skip_init():
        net = transformers.AutoModelForCausalLM.from_config(config, **{dtype_key: dtype})
    net.tie_weights()
    return net


def cpu_state(hf_model) -> dict[str, torch.Tensor]:
    """The model's CPU tensors by name (no copy), to dispatch the same weights again later."""
    return dict(hf_model.state_dict())


def hf_from_state(model_config, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """A fresh (undispatched) transformers model on the CPU tensors of :func:`cpu_state`."""
    net = _skeleton(model_config, dtype)
    net.load_state_dict(state, assign=True)
    net.tie_weights()
    return net.eval()


def release(hf_model) -> None:
    """Remove Accelerate's hooks and give the device memory of a dispatched model back."""
    import gc

    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(hf_model, recurse=True)
    hf_model.to("meta")  # drop its device tensors (CPU ones live on in a cpu_state, if kept)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_from_store(store):
    """A transformers model on the CPU holding the weights of our :class:`WeightStore` (dense).

    Built without random init (fast for 8B shapes); each tensor is copied out of its tier, so both
    systems run literally the same numbers.
    """
    from workbench.offload.store import carve

    net = _skeleton(store.config, store.dtype)
    theirs = dict(net.named_parameters())
    with torch.no_grad():
        for u, unit in enumerate(store.units):
            for p in unit.params:
                target = theirs.get(p.name if p.name == "lm_head.weight" else f"model.{p.name}")
                if target is None and store.config.tie_word_embeddings:
                    target = theirs["model.embed_tokens.weight"]
                if p.name in store.resident:
                    target.copy_(store.resident[p.name])
                    continue
                items = [it for it in store.items[u] if it.param.name == p.name]
                if items[0].part != "w":
                    raise WorkbenchError("hf_from_store needs dense (uncompressed) weights")
                src, off = ((store.files[u].flat, items[0].offset) if items[0].tier == "disk"
                            else (store.images[u], items[0].offset - store.disk_len[u]))
                target.copy_(carve(src, off, store.dtype, p.shape))
    return net.eval()


def dispatch(hf_model, device: torch.device | str, fast_bytes: int,
             offload_dir: str | Path | None = None, host_bytes: int | None = None):
    """Offload ``hf_model`` with Accelerate: at most ``fast_bytes`` of weights on ``device`` (GPU
    or, on a CPU machine, RAM), the rest on the CPU (``host_bytes``, default unlimited) and disk.
    Returns the dispatched model and its device map."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise WorkbenchError("the Accelerate baseline needs the 'accelerate' package "
                             "(pip install accelerate)") from None
    device = torch.device(device)
    host = host_bytes if host_bytes is not None else 1 << 44
    if device.type == "cuda":
        max_memory = {device.index or 0: fast_bytes, "cpu": host}
        main = device.index or 0
    else:
        max_memory = {"cpu": fast_bytes}
        main = "cpu"
    if offload_dir is not None:
        max_memory["disk"] = 1 << 44
    device_map = infer_auto_device_map(hf_model, max_memory=max_memory, no_split_module_classes=NO_SPLIT,
                                       dtype=hf_model.dtype)
    if "disk" in device_map.values() and offload_dir is None:
        raise WorkbenchError("Accelerate needs a disk folder: the model does not fit the budget "
                             "and the host memory given")
    device_map = dict(device_map)
    if main not in device_map.values():  # nothing fits: dispatch_model would compute on the CPU
        device_map = _pin_smallest(hf_model, device_map, main)  # so stream every weight instead
    on_disk = "disk" in device_map.values()
    model = dispatch_model(hf_model, device_map, main_device=main,
                           offload_dir=str(offload_dir) if on_disk else None)
    return model, dict(device_map)


def _pin_smallest(hf_model, device_map: dict, main) -> dict:
    """The same placement with its smallest module (the rotary table, a norm) on ``main``: with
    more than one place in the map, Accelerate computes on ``main`` and streams every other
    module in (with a single place it would just move the model there)."""
    def leaves(module, prefix: str) -> list[str]:
        children = list(module.named_children())
        if not children or type(module).__name__ in NO_SPLIT:
            return [prefix]
        return [n for name, child in children for n in leaves(child, f"{prefix}.{name}"
                                                                if prefix else name)]

    def where(name: str):
        return next(v for k, v in device_map.items()
                    if k == "" or name == k or name.startswith(k + "."))

    full = {name: where(name) for name in leaves(hf_model, "")}
    sizes = {name: sum(t.numel() * t.element_size() for t in hf_model.get_submodule(name).state_dict()
                       .values()) for name in full}
    full[min(full, key=lambda n: (sizes[n], list(full).index(n)))] = main
    return full


def placement_summary(device_map: dict, num_layers: int) -> dict[str, int]:
    """How many decoder layers each place holds (``"0"`` = GPU 0, ``"cpu"``, ``"disk"``)."""
    out: dict[str, int] = {}
    for i in range(num_layers):
        name = f"model.layers.{i}"
        where = next((v for k, v in device_map.items() if k == "" or name == k
                      or name.startswith(k + ".")), "?")
        out[str(where)] = out.get(str(where), 0) + 1
    return out


def evict_folder(folder: str | Path) -> None:
    """Drop the page-cache pages of every file under ``folder`` (the next reads hit the disk)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class _StepTimes:
    """A streamer that stamps each generated step (after the device finished it) and, with
    ``evict``, drops Accelerate's offload files from the page cache after each step, so that its
    disk tier is read cold, as ours is."""

    def __init__(self, device: torch.device, evict: str | Path | None = None):
        self.device, self.times, self.evict = device, [], evict

    def put(self, value: torch.Tensor) -> None:
        if self.evict is not None:
            evict_folder(self.evict)
        if value.dim() == 1:  # the prompt comes first, as [B, P]
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_accelerate(hf_model, prompts: list[list[int]], max_new_tokens: int,
                   device: torch.device | str, pad_token_id: int = 0,
                   evict: str | Path | None = None) -> AccelerateRun:
    """Greedy ``generate`` of exactly ``max_new_tokens`` for all ``prompts`` in one batch
    (``evict``: Accelerate's offload folder, read cold at every step)."""
    device = torch.device(device)
    P = max(map(len, prompts))
    ids = torch.tensor([[pad_token_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    cuda = device.type == "cuda"
    start = None
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    clock = _StepTimes(device, evict)
    if evict is not None:
        evict_folder(evict)
    t0 = time.perf_counter()
    out = hf_model.generate(ids, attention_mask=mask, do_sample=False, num_beams=1,
                            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                            eos_token_id=None, pad_token_id=pad_token_id, streamer=clock)
    if cuda:
        torch.cuda.synchronize(device)
    t = clock.times
    return AccelerateRun(len(prompts), out[:, P:].tolist(), t[0] - t0, t[-1] - t[0],
                         torch.cuda.max_memory_allocated(device) if cuda else None, start,
                         torch.cuda.max_memory_reserved(device) if cuda else None,
                         [b - a for a, b in zip(t, t[1:])])
