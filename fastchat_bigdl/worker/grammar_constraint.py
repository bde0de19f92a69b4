"""Grammar-constrained decoding in the worker: the ``grammar`` generation parameter
(llguidance Lark syntax, see ``api.tool_calling.grammar``) limits every sampled token to
those that keep the output inside the grammar.

It also makes the output fit its token budget. A tool call or JSON reply cut off by
``max_tokens`` is useless to an agent, and an unbounded string or number in a schema can
run that long. So while the output is inside a structure, the constraint keeps a
*closing plan*: the tokens that finish the grammar from here, found greedily on a copy
of the matcher (forced tokens as they come, otherwise the allowed token that closes the
most: ``"``, ``}``, ``]``, then a digit, then the shortest). Near the end of the budget a
sampled token is kept only if the plan after it still fits the tokens left; otherwise
the plan's next token is taken instead. The reply is therefore complete whenever
``max_tokens`` leaves room for the first plan (a short valid call). A plan costs a few
milliseconds; one is made every step only in the last ``len(plan) + 16`` steps, and
before that at halving distances to them.
"""
from __future__ import annotations

import threading
import weakref
from typing import Iterable, List, Optional

import numpy as np
import torch

_tokenizers = weakref.WeakKeyDictionary()
_lock = threading.Lock()
# Every step is checked only this close to the end of the budget (plus the plan's length);
# before that, the plan's length is looked at now and then.
PLAN_HORIZON = 16
MAX_PLAN_STEPS = 256


class GrammarError(ValueError):
    pass


class _TokenizerInfo:
    """llguidance's view of a tokenizer, each token's bytes, and how well each token
    closes a structure."""

    def __init__(self, tokenizer, n_vocab: int, stop_token_ids: Iterable[int]):
        import llguidance.hf

        self.stop_token_ids = sorted(set(stop_token_ids))
        self.ll = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=self.stop_token_ids)
        self.n_vocab = n_vocab
        self._costs: Optional[tuple] = None

    def token_bytes(self, token: int) -> bytes:
        return self.ll.decode_bytes([token])

    @property
    def costs(self) -> tuple:
        """(outside a string, inside a string): per token, lower is better for finishing.
        Outside: closers (``"``, ``}``, ``]``), then a comma (on to the next required key or
        element), then digits, then short tokens; tokens that open an object or array last.
        Inside: the shortest token that starts with the closing quote."""
        if self._costs is None:
            outside = np.full(self.n_vocab, 1e6, dtype=np.float32)
            inside = np.full(self.n_vocab, 1e6, dtype=np.float32)
            for token in range(self.n_vocab):
                text = self.token_bytes(token).decode("utf-8", errors="replace")
                if not text:
                    continue
                chars = set(text)
                if chars <= set('"}] '):
                    outside[token] = -sum(text.count(c) for c in '"}]')
                elif chars <= set('"}], '):
                    outside[token] = 0.5
                elif text.isdigit():
                    outside[token] = 1 + len(text)
                elif chars & set("{["):
                    outside[token] = 100 + len(text)
                else:
                    outside[token] = 10 + len(text)
                inside[token] = len(text) if text.startswith('"') else 1000 + len(text)
            self._costs = (outside, inside)
        return self._costs


def _in_string(text: bytes) -> bool:
    """Whether JSON ``text`` (from the last ``<tool_call>`` on, if any) ends inside a string."""
    start = text.rfind(b"<tool_call>")
    inside = escaped = False
    for byte in text[start + len(b"<tool_call>") if start >= 0 else 0:]:
        if escaped:
            escaped = False
        elif inside and byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # quote
            inside = not inside
    return inside


def _tokenizer_info(tokenizer, n_vocab: int, stop_token_ids: Iterable[int]) -> _TokenizerInfo:
    """Cached per tokenizer (~1 s to build for a 50k vocabulary). The stop tokens count as
    end of sequence: a finished grammar allows only them."""
    key = (n_vocab, tuple(sorted(set(stop_token_ids))))
    with _lock:
        per_tokenizer = _tokenizers.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = _TokenizerInfo(tokenizer, n_vocab, key[1])
        return per_tokenizer[key]


def _allowed(matcher) -> np.ndarray:
    return np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8) != 0


def closing_plan(matcher, info: _TokenizerInfo, text: bytes = b"",
                 max_steps: int = MAX_PLAN_STEPS) -> Optional[List[int]]:
    """Tokens that finish the grammar from ``matcher``'s state, reached after ``text``
    (ending with a stop token), found greedily on a copy; None if none was found within
    ``max_steps``."""
    m = matcher.deep_copy()
    plan: List[int] = []
    outside, inside = info.costs
    while len(plan) < max_steps and not m.is_error():
        if m.is_stopped():
            return plan
        if m.is_accepting():
            return plan + info.stop_token_ids[:1]
        forced = m.compute_ff_tokens()
        if forced:
            if not m.consume_tokens(forced):
                return None
            plan.extend(forced)
            text += b"".join(info.token_bytes(t) for t in forced)
            continue
        candidates = np.flatnonzero(_allowed(m)[: info.n_vocab])
        if candidates.size == 0:
            return None
        cost = inside if _in_string(text) else outside
        token = int(candidates[np.argmin(cost[candidates])])
        if not m.consume_token(token):
            return None
        plan.append(token)
        text += info.token_bytes(token)
    return None


class GrammarConstraint:
    """One generation's grammar state: ``mask`` the logits, sample, let ``within_budget``
    confirm (or replace) the token given the tokens left, then ``advance`` with it."""

    def __init__(self, tokenizer, grammar: str, n_vocab: int, stop_token_ids: Iterable[int]):
        import llguidance

        self.info = _tokenizer_info(tokenizer, n_vocab, stop_token_ids)
        self.matcher = llguidance.LLMatcher(self.info.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self._plan: Optional[List[int]] = None  # closing plan from the current state
        self._look_at: Optional[int] = None  # tokens left when to plan next (None: now)
        self._checked: Optional[tuple] = None  # (token, closing plan after it) from within_budget
        self._text = b""  # what was generated so far

    def mask(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """``logits`` with every token the grammar forbids at -inf (None when it allows none)."""
        allowed = torch.from_numpy(_allowed(self.matcher)[: logits.shape[-1]].copy()).to(logits.device)
        if not bool(allowed.any()):
            return None
        return logits.masked_fill(~allowed, float("-inf"))

    def within_budget(self, token: int, remaining: int) -> int:
        """``token`` if the output can still be finished after it within ``remaining``
        tokens (this one included), else the closing plan's next token. Keeps the
        invariant: from every state, the plan fits the budget left."""
        self._checked = None
        if self.matcher.is_accepting():  # free text, or done: nothing to close
            self._plan = None
            return token
        if self._look_at is not None and remaining > self._look_at:
            return token
        if self._plan is None:
            self._plan = closing_plan(self.matcher, self.info, self._text)
            if self._plan is None:  # no way to finish found: stop trying (each try costs)
                self._look_at = 0
                return token
        window = len(self._plan) + PLAN_HORIZON
        if remaining > window:  # far from the end: look again halfway there (the plan may grow)
            self._look_at = remaining - max(PLAN_HORIZON // 2, (remaining - window) // 2)
            return token
        self._look_at = None  # near the end: every step
        if self._plan and token == self._plan[0]:
            return token
        after = self.matcher.deep_copy()
        plan_after = (closing_plan(after, self.info, self._text + self.info.token_bytes(token))
                      if after.consume_token(token) else None)
        if plan_after is not None and len(plan_after) <= remaining - 1:
            self._checked = (token, plan_after)
            return token
        return self._plan[0] if self._plan else token

    def advance(self, token: int) -> bool:
        """Accept the sampled token; False if the grammar refused it."""
        if self._plan and token == self._plan[0]:
            self._plan = self._plan[1:]  # still the plan from the new state
        elif self._checked is not None and self._checked[0] == token:
            self._plan = self._checked[1]
        else:
            self._plan = None
        self._checked = None
        self._text += self.info.token_bytes(token)
        return bool(self.matcher.consume_token(token))

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()
