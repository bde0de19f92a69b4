"""The KV caches a request's positions live in, behind one protocol (``KVCache``) that the
prefix cache and the token loop use: how many positions it holds, how many of them
another request may reuse, its bytes, and a private copy of a prefix.

- ``SequenceKV``, the lean runner's: one sequence's keys and values for every layer in
  one preallocated tensor. The Hugging Face caches ``cat`` each step's keys onto the
  whole cache (or, in the low-bit library's version, preallocate per layer and still
  copy on growth and on every read). Here a step writes its new positions in place and
  attention reads a view; the storage grows by doubling, so a sequence is copied
  O(log n) times, not once a token.
- ``HuggingFaceKV``: whatever cache the Hugging Face forward returns (``DynamicCache`` or
  legacy per-layer tuples), wrapped.
"""
from __future__ import annotations

from typing import List, Protocol, Tuple

import torch

GROWTH_QUANTUM = 64  # positions; capacities are multiples of this


def _round_up(n: int, quantum: int = GROWTH_QUANTUM) -> int:
    return -(-n // quantum) * quantum


class KVCache(Protocol):
    """What the prefix cache and the token loop need of a KV cache."""

    length: int  # positions held

    @property
    def reusable(self) -> int:
        """Leading positions another request may reuse."""

    @property
    def nbytes(self) -> int:
        """Bytes held, counting preallocated storage."""

    def prefix(self, length: int, room: int = 0) -> "KVCache":
        """A private copy of the first ``length`` positions, with room for ``room`` more."""


class SequenceKV:
    """``data[layer, 0|1, kv_head, position, head_dim]``: keys (0) and values (1) of the
    first ``length`` positions of one sequence, of which the first ``prefilled`` were
    computed as prompt positions (the only ones another request may reuse)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 capacity: int = GROWTH_QUANTUM, limit: int = 0):
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

    @property
    def reusable(self) -> int:
        """Only positions computed as prompt positions: a generated position is rounded
        differently, and a cold request would compute it as a prompt position."""
        return self.prefilled

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

    def prefix(self, length: int, room: int = 0) -> "SequenceKV":
        """A private copy of the first ``length`` positions, with ``room`` for more to come,
        allocated once (0: as compact as the allocation quantum allows, for keeping)."""
        copy = SequenceKV.__new__(SequenceKV)
        copy.limit = self.limit
        copy.data = torch.zeros(*self.data.shape[:3], self._capped(_round_up(max(1, length + room))),
                                self.data.shape[4], dtype=self.data.dtype)
        copy.data[:, :, :, :length] = self.data[:, :, :, :length]
        copy.length = length
        copy.prefilled = min(length, self.prefilled)
        return copy


class HuggingFaceKV:
    """The Hugging Face forward's cache (``cache``: ``DynamicCache``, legacy per-layer
    (keys, values) tuples, or None before the first call) behind ``KVCache``."""

    def __init__(self, cache=None):
        self.cache = cache

    def layers(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        if self.cache is None:
            return []
        if hasattr(self.cache, "key_cache"):
            return list(zip(self.cache.key_cache, self.cache.value_cache))
        return [(layer[0], layer[1]) for layer in self.cache]

    @property
    def length(self) -> int:
        layers = self.layers()
        return layers[0][0].shape[-2] if layers else 0

    @property
    def reusable(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0  # each storage once: the library's caches preallocate
        for keys, values in self.layers():
            for t in (keys, values):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def prefix(self, length: int, room: int = 0) -> "HuggingFaceKV":
        """Copies of the first ``length`` positions in a new cache of the same kind (it grows
        by itself: ``room`` is not needed)."""
        layers = tuple((k[..., :length, :].clone(), v[..., :length, :].clone()) for k, v in self.layers())
        if not hasattr(self.cache, "key_cache"):
            return HuggingFaceKV(layers)
        # The stored tensors as they are (a library cache may hold them quantized), and the
        # position count the class keeps as a plain attribute (4.37: seen_tokens; 4.39+:
        # _seen_tokens, with seen_tokens a read-only property).
        copy = type(self.cache)()
        copy.key_cache = [k for k, _ in layers]
        copy.value_cache = [v for _, v in layers]
        for counter in ("_seen_tokens", "seen_tokens"):
            if counter in vars(copy):
                setattr(copy, counter, length)
        return HuggingFaceKV(copy)
