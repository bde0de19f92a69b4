"""One sequence's keys and values for every layer, in one preallocated tensor.

The Hugging Face caches ``cat`` each step's keys onto the whole cache (or, in the
low-bit library's version, preallocate per layer and still copy on growth and on every
read). Here a step writes its new positions in place and attention reads a view; the
storage grows by doubling, so a sequence is copied O(log n) times, not once a token.
"""
from __future__ import annotations

import torch

GROWTH_QUANTUM = 64  # positions; capacities are multiples of this


def _round_up(n: int, quantum: int = GROWTH_QUANTUM) -> int:
    return -(-n // quantum) * quantum


class SequenceKV:
    """``data[layer, 0|1, kv_head, position, head_dim]``: keys (0) and values (1) of the
    first ``length`` positions of one sequence, of which the first ``prefilled`` were
    computed as prompt positions (the only ones another request may reuse)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = GROWTH_QUANTUM,
                 dtype: torch.dtype = torch.float32, limit: int = 0):
        self.limit = limit  # the model's context length: never allocate beyond it (0 = none)
        # Zeroed, not empty: a prefill block attends over positions not written yet (masked;
        # 0 x garbage could be NaN).
        self.data = torch.zeros(layers, 2, kv_heads, self._capped(_round_up(max(1, capacity))), head_dim,
                                dtype=dtype)
        self.length = 0
        self.prefilled = 0

    def _capped(self, capacity: int) -> int:
        return min(capacity, _round_up(self.limit)) if self.limit else capacity

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` positions in total."""
        if positions <= self.capacity:
            return
        grown = self._capped(_round_up(max(positions, 2 * self.capacity)))
        data = torch.zeros(*self.data.shape[:3], max(grown, positions), self.data.shape[4], dtype=self.data.dtype)
        data[:, :, :, :self.length] = self.data[:, :, :, :self.length]
        self.data = data

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``keys``/``values``: [positions, kv_heads, head_dim] for positions start, start+1, ..."""
        end = start + keys.shape[0]
        self.data[layer, 0, :, start:end] = keys.transpose(0, 1)
        self.data[layer, 1, :, start:end] = values.transpose(0, 1)

    def keys(self, layer: int, begin: int, end: int) -> torch.Tensor:
        return self.data[layer, 0, :, begin:end]

    def values(self, layer: int, begin: int, end: int) -> torch.Tensor:
        return self.data[layer, 1, :, begin:end]

    def prefix(self, length: int, room: int = GROWTH_QUANTUM) -> "SequenceKV":
        """A private copy of the first ``length`` positions, with ``room`` for more to come
        (0: as compact as the allocation quantum allows, for keeping)."""
        copy = SequenceKV.__new__(SequenceKV)
        copy.limit = self.limit
        copy.data = torch.zeros(*self.data.shape[:3], self._capped(_round_up(max(1, length + room))),
                                self.data.shape[4], dtype=self.data.dtype)
        copy.data[:, :, :, :length] = self.data[:, :, :, :length]
        copy.length = length
        copy.prefilled = min(length, self.prefilled)
        return copy
