"""The worker's token loop: FastChat's ``generate_stream`` contract (same params, same
yielded dicts), written as a loop that hands its model calls to whoever drives it (the
worker's engine, which batches them across streams, or ``generate_stream`` directly),
with what FastChat's loop lacks:

- KV prefix reuse (``prefix_cache.PrefixCache``): only the part of the prompt not seen in an
  earlier request is prefilled;
- incremental detokenization: each token decodes a few-token window instead of the whole
  output (FastChat re-decodes everything every ``stream_interval`` tokens);
- stop strings matched on the new text only, including stops that span tokens, and
  text that could still become a stop is held back, never emitted;
- the lean runner (``engine.llama_runner``) in place of the Hugging Face forward, when
  the worker has one for its model;
- an optional ``grammar`` parameter (``grammar_constraint.GrammarConstraint``) that limits
  the output to a grammar and fits it into ``max_new_tokens``, as tool calls need.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from fastchat.serve.inference import prepare_logits_processor

from fastchat_bigdl.common.stop_strings import StopMatcher
from fastchat_bigdl.engine.llama_runner import LlamaRunner
from fastchat_bigdl.engine.requests import Compute, Decode, Prefill
from fastchat_bigdl.worker.grammar_constraint import GrammarConstraint
from fastchat_bigdl.worker.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class IncrementalDecoder:
    """Streaming detokenizer (the prefix/read-offset scheme of TGI and vLLM): decodes a
    small window around each new token, and waits while a multi-byte character is
    incomplete (the window then ends in U+FFFD)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: List[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, spaces_between_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""


@torch.inference_mode()
def _hf_forward(model, tokens: List[int], past, device: str):
    return model(input_ids=torch.as_tensor([tokens], device=device), past_key_values=past, use_cache=True)


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> int:
    if temperature < 1e-5 or top_p < 1e-8:  # greedy, as FastChat
        return int(torch.argmax(logits))
    return int(torch.multinomial(torch.softmax(logits.float(), dim=-1), num_samples=1))


def generate_stream(*args, runner: Optional[LlamaRunner] = None, **kwargs) -> Iterator[Dict]:
    """FastChat's ``generate_stream`` contract (``token_loop``'s parameters), run on the
    calling thread: the loop's model calls are answered directly (in the worker, its
    engine answers them instead, batched with other streams)."""
    loop = token_loop(*args, runner=runner, **kwargs)
    reply = None
    try:
        while True:
            item = loop.send(reply)
            reply = None
            if isinstance(item, Prefill):
                reply = runner.prefill(item.tokens, item.kv, all_logits=item.all_logits)
            elif isinstance(item, Decode):
                reply = runner.decode([(item.token, item.kv)])
            elif isinstance(item, Compute):
                reply = item.fn()
            else:
                yield item
    except StopIteration:
        return
    finally:
        loop.close()


@torch.inference_mode()
def token_loop(
    model,
    tokenizer,
    params: Dict,
    device: str,
    context_len: int,
    stream_interval: int = 2,
    judge_sent_end: bool = False,
    prefix_cache: Optional[PrefixCache] = None,
    runner: Optional[LlamaRunner] = None,
) -> Iterator:
    """The loop of one request: yields output chunks (dicts, FastChat's contract) and the
    model calls it needs (``engine.requests``: ``Prefill``/``Decode`` for the lean
    ``runner``, ``Compute`` for ``model``'s forward), whose answers come back by ``send``."""
    prompt = params["prompt"]
    temperature = float(params.get("temperature", 1.0))
    repetition_penalty = float(params.get("repetition_penalty", 1.0))
    top_p = float(params.get("top_p", 1.0))
    top_k = int(params.get("top_k", -1))
    max_new_tokens = int(params.get("max_new_tokens", 256))
    logprobs = params.get("logprobs", None)
    echo = bool(params.get("echo", True))
    stop = StopMatcher(params.get("stop", None))
    stop_token_ids = set(params.get("stop_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        stop_token_ids.add(tokenizer.eos_token_id)
    processors = prepare_logits_processor(temperature, repetition_penalty, top_p, top_k)
    grammar = params.get("grammar")
    constraint = (GrammarConstraint(tokenizer, grammar, model.config.vocab_size, stop_token_ids)
                  if grammar else None)

    input_ids = tokenizer(prompt).input_ids
    input_ids = input_ids[-max(1, context_len - max_new_tokens - 1):]  # FastChat's truncation
    prompt_tokens = len(input_ids)

    # Prompt logprobs need the logits of every prompt position: no reuse then.
    past, reused = (None, 0)
    if prefix_cache is not None and not (echo and logprobs is not None):
        past, reused = prefix_cache.take(input_ids, total_positions=len(input_ids) + max_new_tokens)
    fed: List[int] = list(input_ids[:reused])
    pending: List[int] = list(input_ids[reused:])
    if prefix_cache is not None:
        logger.info("prompt %d tokens: %d reused from the prefix cache, %d to prefill",
                    prompt_tokens, reused, len(pending))

    # Token history for the repetition penalty, filled in place: no per-token list->tensor copy.
    history = (torch.empty(1, len(input_ids) + max_new_tokens, dtype=torch.long, device=device)
               if repetition_penalty > 1.0 else None)
    if history is not None:
        history[0, :len(fed)] = torch.as_tensor(fed, dtype=torch.long)
    token_logprobs: List[Optional[float]] = []
    tokens_text: List[str] = []
    decoder = IncrementalDecoder(tokenizer)
    text = ""
    emitted = 0
    generated: List[int] = []
    finish_reason = None
    out = all_logits = None
    try:
        for step in range(max_new_tokens):
            need_all = step == 0 and echo and logprobs is not None
            if runner is not None and step == 0:
                if past is None:
                    past = runner.new_sequence(len(input_ids) + max_new_tokens)
                all_logits = yield Prefill(list(pending), past, need_all)
            elif runner is not None:
                all_logits = yield Decode(pending[0], past)
            else:
                out = yield Compute(functools.partial(_hf_forward, model, pending, past, device))
                past, all_logits = out.past_key_values, out.logits[0]
            if history is not None:
                history[0, len(fed):len(fed) + len(pending)] = torch.as_tensor(pending, dtype=torch.long)
            fed.extend(pending)
            logits = all_logits[-1, :]
            if need_all:
                shifted = torch.log_softmax(all_logits[:-1, :].float(), dim=-1)
                token_logprobs = [None] + shifted.gather(1, torch.as_tensor(input_ids[1:])[:, None])[:, 0].tolist()
                tokens_text = [tokenizer.decode([t]) for t in input_ids]
            scores = logits
            if constraint is not None:
                scores = constraint.mask(logits)
                if scores is None:  # nothing can continue the grammar
                    finish_reason = "stop"
                    break
            if processors:
                seen = history[:, :len(fed)] if history is not None else None
                scores = processors(seen, scores[None, :])[0]
            token = _sample(scores, temperature, top_p)
            if constraint is not None:  # the call must still fit the tokens left
                token = constraint.within_budget(token, remaining=max_new_tokens - step)
            if constraint is not None and not constraint.advance(token):
                logger.warning("the grammar refused token %d; generation ends here", token)
                finish_reason = "stop"
                break
            generated.append(token)
            if logprobs is not None:
                token_logprobs.append(float(torch.log_softmax(logits.float(), dim=-1)[token]))
                tokens_text.append(tokenizer.decode([token]))
            if token in stop_token_ids:
                finish_reason = "stop"
                break
            new_text = decoder.add(token)
            text += new_text
            hit = stop.find(text, len(new_text))
            if hit != -1:
                text = text[:hit]
                finish_reason = "stop"
                break
            if constraint is not None and constraint.finished:
                finish_reason = "stop"
                break
            pending = [token]
            if step % stream_interval == 0:
                visible = len(text) - stop.held_back(text)
                if visible > emitted:
                    emitted = visible
                    yield _chunk(prompt, text[:visible], echo, prompt_tokens, len(generated), None,
                                 token_logprobs, tokens_text, logprobs)
        else:
            finish_reason = "length"
        yield _chunk(prompt, text, echo, prompt_tokens, len(generated), finish_reason,
                     token_logprobs, tokens_text, logprobs)
    finally:
        # ``fed`` is exactly what ``past`` holds; keep it for the next turn.
        if prefix_cache is not None and past is not None and finish_reason is not None:
            prefix_cache.put(fed, past)
        del past, out, all_logits
        if str(device).startswith("xpu"):
            torch.xpu.empty_cache()


def _chunk(prompt, text, echo, prompt_tokens, completion_tokens, finish_reason,
           token_logprobs, tokens_text, logprobs) -> Dict:
    ret_logprobs = None
    if logprobs is not None:
        offsets, pos = [], 0
        for piece in tokens_text:
            offsets.append(pos)
            pos += len(piece)
        ret_logprobs = {"text_offset": offsets, "tokens": list(tokens_text),
                        "token_logprobs": list(token_logprobs), "top_logprobs": [{}] * len(tokens_text)}
    return {
        "text": prompt + text if echo else text,
        "logprobs": ret_logprobs,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "finish_reason": finish_reason,
    }
