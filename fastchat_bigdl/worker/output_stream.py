"""What one request's client sees: the generated tokens as text, decoded incrementally,
cut at stop strings (text that could still become one is held back, never emitted),
token logprobs, and FastChat's chunk dicts (``text``, ``logprobs``, ``usage``,
``finish_reason``)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from fastchat_bigdl.common.stop_strings import StopMatcher


class IncrementalDecoder:
    """Streaming detokenizer (the prefix/read-offset scheme of TGI and vLLM): decodes a
    small window around each new token, and waits while a multi-byte character is
    incomplete (the window then ends in U+FFFD). FastChat re-decodes the whole output
    every ``stream_interval`` tokens."""

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


class OutputStream:
    """The output of one request, token by token."""

    def __init__(self, tokenizer, params: Dict, prompt_tokens: int):
        self.tokenizer = tokenizer
        self.prompt = params["prompt"]
        self.echo = bool(params.get("echo", True))
        self.logprobs = params.get("logprobs", None)
        self.stop = StopMatcher(params.get("stop", None))
        self.prompt_tokens = prompt_tokens
        # False where a tool call opens with a special token (Mistral's [TOOL_CALLS]).
        self.decoder = IncrementalDecoder(tokenizer, bool(params.get("skip_special_tokens", True)))
        self.text = ""
        self.emitted = 0  # characters already sent
        self.generated = 0
        self.token_logprobs: List[Optional[float]] = []
        self.tokens_text: List[str] = []
        self.top_logprobs: List[Dict[str, float]] = []  # the ``logprobs`` most likely tokens at each step

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs is not None

    def score_prompt(self, input_ids: Sequence[int], all_logits: torch.Tensor) -> None:
        """Logprobs of the prompt's tokens, from the logits of every prompt position."""
        shifted = torch.log_softmax(all_logits[:-1, :].float(), dim=-1)
        self.token_logprobs = [None] + shifted.gather(1, torch.as_tensor(input_ids[1:])[:, None])[:, 0].tolist()
        self.tokens_text = [self.tokenizer.decode([t]) for t in input_ids]
        self.top_logprobs = [{}] + [self._top(row) for row in shifted]

    def count(self, token: int, logits: torch.Tensor) -> None:
        """A generated token (stop tokens too: they count, and have a logprob)."""
        self.generated += 1
        if self.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            self.token_logprobs.append(float(logprobs[token]))
            self.tokens_text.append(self.tokenizer.decode([token]))
            self.top_logprobs.append(self._top(logprobs))

    def _top(self, logprobs: torch.Tensor) -> Dict[str, float]:
        """The ``logprobs`` most likely tokens' texts and logprobs (most likely first; tokens
        with the same text keep the likelier one)."""
        if not self.logprobs:
            return {}
        values, ids = logprobs.topk(int(self.logprobs))
        top: Dict[str, float] = {}
        for value, index in zip(values.tolist(), ids.tolist()):
            top.setdefault(self.tokenizer.decode([index]), value)
        return top

    def extend(self, token: int) -> bool:
        """Add a counted token's text; True when a stop string ends the output (cut there)."""
        new_text = self.decoder.add(token)
        self.text += new_text
        hit = self.stop.find(self.text, len(new_text))
        if hit == -1:
            return False
        self.text = self.text[:hit]
        return True

    def partial(self) -> Optional[Dict]:
        """A chunk with the text that can be shown now, if there is more than was sent."""
        visible = len(self.text) - self.stop.held_back(self.text)
        if visible <= self.emitted:
            return None
        self.emitted = visible
        return self._chunk(self.text[:visible], None)

    def final(self, finish_reason: str) -> Dict:
        return self._chunk(self.text, finish_reason)

    def _chunk(self, text: str, finish_reason: Optional[str]) -> Dict:
        ret_logprobs = None
        if self.logprobs is not None:
            offsets, pos = [], 0
            for piece in self.tokens_text:
                offsets.append(pos)
                pos += len(piece)
            ret_logprobs = {"text_offset": offsets, "tokens": list(self.tokens_text),
                            "token_logprobs": list(self.token_logprobs), "top_logprobs": list(self.top_logprobs)}
        return {
            "text": self.prompt + text if self.echo else text,
            "logprobs": ret_logprobs,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.generated,
                      "total_tokens": self.prompt_tokens + self.generated},
            "finish_reason": finish_reason,
        }
