"""What FastChat's chat and completions handlers both drop, done once for this package's
two routes that restore it (``tool_calling.route``, ``completions``): each choice's own
seed, the usage summed over choices, and whether a stream asked for a usage chunk."""
from __future__ import annotations

from typing import Dict

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def wants_usage_chunk(data: dict) -> bool:
    """``stream_options.include_usage`` on a streamed request."""
    return data.get("stream") is True and bool((data.get("stream_options") or {}).get("include_usage"))


def choice_params(gen_params: dict, index: int) -> dict:
    """The parameters of choice ``index`` of ``n``: a seeded request's choices each get a
    seed of their own (seed + index), so they differ and each is reproducible."""
    if "seed" not in gen_params:
        return gen_params
    return dict(gen_params, seed=(gen_params["seed"] + index) % (1 << 64))


def no_usage() -> Dict[str, int]:
    return dict.fromkeys(USAGE_KEYS, 0)


def add_usage(total: Dict[str, int], content: dict) -> None:
    """Add one worker answer's usage to ``total``."""
    for key in total:
        total[key] += (content.get("usage") or {}).get(key, 0)
