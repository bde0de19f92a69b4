"""Whether a grammar compiles: the ``grammar`` generation parameter (llguidance's Lark
syntax) is checked by the API server when it builds one from a request's tools and by
the worker when a request arrives with one, so both refuse the same grammars alike."""
from __future__ import annotations

import functools
from typing import Optional


@functools.lru_cache(maxsize=256)  # a request's schemas are checked on arrival, then used
def grammar_problem(grammar: str) -> Optional[str]:
    """Why llguidance cannot compile ``grammar``, in one line (None when it can)."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar, None)
    if not error:
        return None
    # llguidance reports "at L(C): <reason>" followed by the grammar; keep the reason.
    first = error.strip().splitlines()[0]
    return first.split(": ", 1)[-1] if first.startswith("at ") else first
