"""Stop strings matched on a growing text: the worker ends generation on them, and the API
server holds back streamed text that may still become a ``<tool_call>`` tag."""
from __future__ import annotations


class StopMatcher:
    """Finds any of several stop strings in a growing text, looking only at the tail
    where a new match can start."""

    def __init__(self, stops):
        if isinstance(stops, str):
            stops = [stops]
        self.stops = [s for s in (stops or []) if isinstance(s, str) and s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_chars: int) -> int:
        """Index of the earliest stop that ends in the last ``new_chars`` chars, or -1."""
        if not self.stops:
            return -1
        start = max(0, len(text) - new_chars - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i != -1]
        return min(hits) if hits else -1

    def held_back(self, text: str) -> int:
        """How many trailing chars could still be the start of a stop string."""
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
