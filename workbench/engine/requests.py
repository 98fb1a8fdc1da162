"""Checks every engine applies to a request before it is scheduled."""

from __future__ import annotations

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
