"""Checks of the worker API's requests (FastChat's ``/worker_generate_stream`` and friends,
which upstream answers with a stack trace on bad input), run by
``common.validation.ValidateRequests`` in the worker process."""
from __future__ import annotations

from fastchat_bigdl.common.errors import Invalid
from fastchat_bigdl.common.grammar_check import grammar_problem
from fastchat_bigdl.common.validation import check_number, check_stop, is_int


def check_worker_generate(data: dict) -> None:
    if not isinstance(data.get("prompt"), str):
        raise Invalid("'prompt' must be a string")
    for key in ("temperature", "top_p", "repetition_penalty"):
        check_number(data, key, low=0)
    check_number(data, "top_k", integer=True)
    check_number(data, "max_new_tokens", integer=True, low=1)
    check_number(data, "logprobs", integer=True, low=0, high=20)
    check_number(data, "seed", integer=True, low=-(1 << 63), high=(1 << 64) - 1)
    check_stop(data)
    ids = data.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(is_int(i) for i in ids)):
        raise Invalid("'stop_token_ids' must be a list of integers")
    for key in ("echo", "skip_special_tokens"):
        if key in data and not isinstance(data[key], bool):
            raise Invalid(f"'{key}' must be true or false")
    grammar = data.get("grammar")
    if grammar is not None:
        problem = grammar_problem(grammar) if isinstance(grammar, str) else "it must be a string"
        if problem:
            raise Invalid(f"'grammar' is not a grammar this worker can enforce: {problem}")


def check_worker_count(data: dict) -> None:
    if not isinstance(data.get("prompt"), str):
        raise Invalid("'prompt' must be a string")


WORKER_CHECKS = {
    "/worker_generate_stream": check_worker_generate,
    "/worker_generate": check_worker_generate,
    "/count_token": check_worker_count,
}
