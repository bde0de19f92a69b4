"""The next token of one request: FastChat's logits processors (temperature, top-p,
top-k, repetition penalty), a random generator of its own when the request has a
``seed`` (the same seed draws the same tokens whatever other requests are running, as
the logits are the same alone or batched), and, for tool calls and JSON replies, a
grammar that limits every token and fits the output into its token budget
(``grammar_constraint``)."""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional, Sequence

import torch
from fastchat.serve.inference import prepare_logits_processor

from fastchat_bigdl.worker.grammar_constraint import GrammarConstraint

logger = logging.getLogger(__name__)


class Sampler:
    """Chooses tokens for one request from its generation ``params`` (FastChat's names)."""

    def __init__(self, params: Dict, tokenizer, vocab_size: int, stop_token_ids: Iterable[int], positions: int,
                 device: str = "cpu"):
        self.temperature = float(params.get("temperature", 1.0))
        self.top_p = float(params.get("top_p", 1.0))
        penalty = float(params.get("repetition_penalty", 1.0))
        self.processors = prepare_logits_processor(self.temperature, penalty, self.top_p,
                                                   int(params.get("top_k", -1)))
        grammar = params.get("grammar")
        self.constraint = GrammarConstraint(tokenizer, grammar, vocab_size, stop_token_ids) if grammar else None
        # Tokens seen so far, for the repetition penalty: filled in place (``positions``
        # = prompt + new tokens), no per-token list -> tensor copy.
        self.history = torch.empty(1, positions, dtype=torch.long, device=device) if penalty > 1.0 else None
        self.seen = 0
        seed = params.get("seed")
        self.generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def feed(self, tokens: Sequence[int]) -> None:
        """Tokens the model has now seen (the prompt, then each chosen token)."""
        if self.history is not None:
            self.history[0, self.seen:self.seen + len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        self.seen += len(tokens)

    def choose(self, logits: torch.Tensor, remaining: int) -> Optional[int]:
        """The next token from ``logits`` [vocab], with ``remaining`` tokens of budget
        including this one; None when the grammar ends the output here."""
        scores = logits
        if self.constraint is not None:
            scores = self.constraint.mask(logits)
            if scores is None:  # nothing can continue the grammar
                return None
        if self.processors:
            seen = self.history[:, :self.seen] if self.history is not None else None
            scores = self.processors(seen, scores[None, :])[0]
        if self.temperature < 1e-5 or self.top_p < 1e-8:  # greedy, as FastChat
            token = int(torch.argmax(scores))
        else:
            probs = torch.softmax(scores.float(), dim=-1)
            if self.generator is not None:  # the request's own draws (on the CPU, where its generator is)
                token = int(torch.multinomial(probs.cpu(), num_samples=1, generator=self.generator))
            else:
                token = int(torch.multinomial(probs, num_samples=1))
        if self.constraint is None:
            return token
        token = self.constraint.within_budget(token, remaining)  # the call must still fit the tokens left
        if not self.constraint.advance(token):
            logger.warning("the grammar refused token %d; generation ends here", token)
            return None
        return token

    @property
    def grammar_complete(self) -> bool:
        return self.constraint is not None and self.constraint.finished
