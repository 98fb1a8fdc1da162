"""Requests, what happened to them (traces), and the checks every engine applies first."""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig


def check_request(config: ModelConfig, prompt_ids: list[int], max_new_tokens: int,
                  where: str) -> None:
    """Raise WorkbenchError (prefixed with ``where``) unless the request can run on this model."""
    if not prompt_ids:
        raise WorkbenchError(f"{where}: empty prompt (at least one token is needed)")
    bad = [i for i in prompt_ids if not (isinstance(i, int) and 0 <= i < config.vocab_size)]
    if bad:
        raise WorkbenchError(f"{where}: token ids {bad[:5]} outside the vocabulary "
                             f"(0..{config.vocab_size - 1})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise WorkbenchError(f"{where}: max_new_tokens must be an integer >= 0, "
                             f"got {max_new_tokens!r}")
    context = config.max_position_embeddings
    if len(prompt_ids) > context:
        raise WorkbenchError(f"{where}: prompt is {len(prompt_ids)} tokens, longer than the "
                             f"model's context of {context}")
    if len(prompt_ids) + max_new_tokens > context:
        raise WorkbenchError(f"{where}: prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                             f"({max_new_tokens}) exceeds the model's context of {context}")


def per_request_limits(max_new_tokens: int | list[int], n: int) -> list[int]:
    """One max_new_tokens per request, from a shared value or a list of length ``n``."""
    if isinstance(max_new_tokens, list):
        if len(max_new_tokens) != n:
            raise WorkbenchError(f"{len(max_new_tokens)} max_new_tokens values for {n} prompts")
        return max_new_tokens
    return [max_new_tokens] * n


@dataclass(frozen=True)
class Request:
    """One generation request as a workload or a user submits it."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0  # seconds after the run starts when the request arrives
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks with set lengths)
    id: int = 0


@dataclass
class RequestTrace:
    """What happened to one request: its tokens and when each one came out."""

    request_id: int
    arrival_s: float
    prompt_len: int
    output_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # seconds since run start, per token
    scheduled_s: float | None = None  # first time the request's prompt entered a batch
    finish_s: float | None = None
    finish_reason: str | None = None  # "eos", "length", "cancelled", "rejected"
    error: str | None = None  # why a rejected request was rejected


def reject_if_invalid(config: ModelConfig, request: Request, trace: RequestTrace,
                      max_len: int | None = None, now: float = 0.0) -> bool:
    """Mark ``trace`` rejected (with the reason) if the request cannot run; True if rejected.

    ``max_len`` is the KV room one sequence may use, when smaller than the model's context.
    Engines call this so that one bad request fails alone while the others complete.
    """
    try:
        check_request(config, list(request.prompt_ids), request.max_new_tokens,
                      f"request {request.id}")
        total = len(request.prompt_ids) + request.max_new_tokens
        if max_len is not None and total > max_len:
            raise WorkbenchError(f"request {request.id}: prompt + max_new_tokens = {total} "
                                 f"tokens exceeds the KV budget of {max_len} per sequence")
    except WorkbenchError as err:
        trace.finish_reason, trace.error, trace.finish_s = "rejected", str(err), now
        return True
    return False
