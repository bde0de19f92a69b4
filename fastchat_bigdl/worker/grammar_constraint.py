"""Grammar-constrained decoding in the worker: the ``grammar`` generation parameter
(llguidance Lark syntax, see ``tool_calling.grammar``) limits every sampled token to
those that keep the output inside the grammar."""
from __future__ import annotations

import threading
import weakref
from typing import Iterable, Optional

import torch

_tokenizers = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class GrammarError(ValueError):
    pass


def _ll_tokenizer(tokenizer, n_vocab: int, stop_token_ids: Iterable[int]):
    """llguidance's view of the tokenizer (~1 s to build for a 50k vocabulary; cached).
    The stop tokens count as end of sequence: a finished grammar allows only them."""
    import llguidance.hf

    key = (n_vocab, tuple(sorted(set(stop_token_ids))))
    with _lock:
        per_tokenizer = _tokenizers.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(key[1]))
        return per_tokenizer[key]


class GrammarConstraint:
    """One generation's grammar state: ``mask`` the logits, then ``advance`` with the
    token sampled from them."""

    def __init__(self, tokenizer, grammar: str, n_vocab: int, stop_token_ids: Iterable[int]):
        import llguidance

        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, n_vocab, stop_token_ids), grammar,
                                            log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    def mask(self, logits: torch.Tensor) -> Optional[torch.Tensor]:
        """``logits`` with every token the grammar forbids at -inf (None when it allows none)."""
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        allowed = allowed[: logits.shape[-1]].to(logits.device).bool()
        if not bool(allowed.any()):
            return None
        return logits.masked_fill(~allowed, float("-inf"))

    def advance(self, token: int) -> bool:
        """Accept the sampled token; False if the grammar refused it."""
        return bool(self.matcher.consume_token(token))

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()
