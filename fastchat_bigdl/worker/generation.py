"""The worker's token loop: FastChat's ``generate_stream`` contract (same params, same
yielded dicts), written as a generator that hands its model calls to the engine that
drives it (``engine.scheduler``: batched with other streams in the worker, inline on the
caller's thread in ``generate_stream``), with what FastChat's loop lacks:

- KV prefix reuse (``prefix_cache.PrefixCache``): only the part of the prompt not seen in an
  earlier request is prefilled;
- memory admitted in bytes: the KV cache a request can reach is reserved (``Reserve``)
  before anything is allocated, and the engine grants it within the worker's budget;
- the lean runner (``engine.llama_runner``) in place of the Hugging Face forward, when
  the worker has one for its model;
- token choice in ``sampler`` (FastChat's processors, an optional ``grammar`` that limits
  the output and fits it into ``max_new_tokens``), text in ``output_stream`` (incremental
  detokenization, stop strings that may span tokens, held-back text, logprobs).
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, Iterator, List, Optional

import torch

from fastchat_bigdl.engine.kv_cache import HuggingFaceKV, KVCache
from fastchat_bigdl.engine.llama_runner import LlamaRunner
from fastchat_bigdl.engine.requests import Compute, Decode, Prefill, Reserve
from fastchat_bigdl.engine.scheduler import Engine
from fastchat_bigdl.worker.output_stream import OutputStream
from fastchat_bigdl.worker.prefix_cache import PrefixCache, kv_bytes_per_token
from fastchat_bigdl.worker.sampler import Sampler

logger = logging.getLogger(__name__)


def generate_stream(*args, runner: Optional[LlamaRunner] = None, **kwargs) -> Iterator[Dict]:
    """FastChat's ``generate_stream`` contract (``token_loop``'s parameters), run on the
    calling thread by the same engine the worker serves with (inline: no thread)."""
    engine = Engine(runner=runner, inline=True)
    return engine.streamer(functools.partial(token_loop, runner=runner))(*args, **kwargs)


@torch.inference_mode()
def _hf_forward(model, tokens: List[int], kv: HuggingFaceKV, device: str) -> torch.Tensor:
    """The Hugging Face forward over ``tokens`` after ``kv``'s positions; the logits of every
    token fed, and ``kv`` now holds them."""
    out = model(input_ids=torch.as_tensor([tokens], device=device), past_key_values=kv.cache, use_cache=True)
    kv.cache = out.past_key_values
    return out.logits[0]


def _model_calls(model, runner: Optional[LlamaRunner], kv: KVCache, device: str):
    """(the request for a prompt, the request for one generated token): the lean runner's
    ``Prefill``/``Decode`` (batched by the engine), or the Hugging Face forward run alone."""
    if runner is not None:
        return (lambda tokens, all_logits: Prefill(tokens, kv, all_logits)), (lambda token: Decode(token, kv))
    forward = functools.partial(_hf_forward, model, kv=kv, device=device)
    return (lambda tokens, all_logits: Compute(functools.partial(forward, tokens))), \
        (lambda token: Compute(functools.partial(forward, [token])))


def _generate(output: OutputStream, sampler: Sampler, stop_token_ids, max_new_tokens: int, stream_interval: int,
              input_ids: List[int], reused: int, fed: List[int], prefill, decode):
    """Prefill, then choose and feed tokens until a stop or the budget; yields model
    requests and partial chunks, returns the finish reason (None: the budget ran out)."""
    logits = yield prefill(list(input_ids[reused:]), output.wants_prompt_logprobs)
    if output.wants_prompt_logprobs:
        output.score_prompt(input_ids, logits)
    for step in range(max_new_tokens):
        token = sampler.choose(logits[-1], remaining=max_new_tokens - step)
        if token is None:
            return "stop"
        output.count(token, logits[-1])
        if token in stop_token_ids or output.extend(token) or sampler.grammar_complete:
            return "stop"
        if step % stream_interval == 0:
            chunk = output.partial()
            if chunk is not None:
                yield chunk
        if step + 1 < max_new_tokens:
            sampler.feed([token])
            fed.append(token)
            logits = yield decode(token)
    return None


@torch.inference_mode()
def token_loop(model, tokenizer, params: Dict, device: str, context_len: int, stream_interval: int = 2,
               judge_sent_end: bool = False, prefix_cache: Optional[PrefixCache] = None,
               runner: Optional[LlamaRunner] = None) -> Iterator:
    """The loop of one request: yields output chunks (dicts, FastChat's contract) and the
    model calls it needs (``engine.requests``), whose answers (logits) come back by ``send``."""
    max_new_tokens = int(params.get("max_new_tokens", 256))
    stop_token_ids = set(params.get("stop_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        stop_token_ids.add(tokenizer.eos_token_id)
    input_ids = tokenizer(params["prompt"]).input_ids
    input_ids = input_ids[-max(1, context_len - max_new_tokens - 1):]  # FastChat's truncation
    output = OutputStream(tokenizer, params, len(input_ids))
    sampler = Sampler(params, tokenizer, model.config.vocab_size, stop_token_ids,
                      len(input_ids) + max_new_tokens, device)
    sampler.feed(input_ids)

    positions = len(input_ids) + max_new_tokens
    reuse = prefix_cache is not None and not output.wants_prompt_logprobs  # those need every position's logits
    reservation = yield Reserve(_kv_bytes(model, runner, positions),
                                f"a request of {len(input_ids)} prompt tokens and up to {max_new_tokens} new ones",
                                prompt=input_ids if reuse else ())
    kv, reused, finish_reason = None, 0, None
    try:
        if reuse:
            kv, reused = prefix_cache.take(input_ids, total_positions=positions)
            logger.info("prompt %d tokens: %d reused from the prefix cache, %d to prefill",
                        len(input_ids), reused, len(input_ids) - reused)
        if kv is None:
            kv = runner.new_sequence(positions) if runner is not None else HuggingFaceKV()
        prefill, decode = _model_calls(model, runner, kv, device)
        fed = list(input_ids)  # what ``kv`` holds once the pending call is answered
        if max_new_tokens > 0:
            finish_reason = yield from _generate(output, sampler, stop_token_ids, max_new_tokens, stream_interval,
                                                 input_ids, reused, fed, prefill, decode)
        finish_reason = finish_reason or "length"
        yield output.final(finish_reason)
    finally:
        # The reservation goes back first: the prefix cache the finished KV goes to is
        # bounded by what running requests leave. ``fed`` is exactly what ``kv`` holds.
        reservation.release()
        if prefix_cache is not None and finish_reason is not None:
            prefix_cache.put(fed, kv)
        del kv
        if str(device).startswith("xpu"):
            torch.xpu.empty_cache()


def _kv_bytes(model, runner: Optional[LlamaRunner], positions: int) -> int:
    """Bytes of KV cache a request of ``positions`` positions can reach: what the lean
    runner allocates for it; for the Hugging Face forward its cache in the model's dtype."""
    if runner is not None:
        return runner.kv_bytes(positions)
    return hf_kv_bytes_per_position(model) * positions


def hf_kv_bytes_per_position(model) -> int:
    """The Hugging Face forward's KV per position in the model's dtype (0 for a model whose
    config does not describe attention heads: nothing to reserve by)."""
    try:
        return kv_bytes_per_token(model.config, getattr(model, "dtype", torch.float32).itemsize)
    except AttributeError:
        return 0
