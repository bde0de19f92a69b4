"""The KV caches a request's positions live in, behind one protocol (``KVCache``) that the
prefix cache and the token loop use: how many positions it holds, how many of them
another request may reuse, its bytes, and a private copy of a prefix.

- ``SequenceKV``, the lean runner's: one sequence's keys and values, one preallocated
  tensor per layer. The Hugging Face caches ``cat`` each step's keys onto the
  whole cache (or, in the low-bit library's version, preallocate per layer and still
  copy on growth and on every read). Here a step writes its new positions in place and
  attention reads a view; the storage grows by doubling, so a sequence is copied
  O(log n) times, not once a token. Stored in one of ``KV_CACHE_DTYPES``: fp32; bf16
  (half the bytes; attention reads the stored tensors as they are, in bf16 with fp32
  accumulation); int8 with one bf16 scale per position and head (a quarter of fp32's
  bytes plus 2 per head; attention reads a bf16 copy of the range it needs, made per
  call: memory bought with time).
- ``HuggingFaceKV``: whatever cache the Hugging Face forward returns (``DynamicCache`` or
  legacy per-layer tuples), wrapped.
"""
from __future__ import annotations

from typing import List, Optional, Protocol, Tuple

import torch

GROWTH_QUANTUM = 64  # positions; capacities are multiples of this
KV_CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
INT8_LEVELS = 127  # symmetric: a position's head is stored as round(x / scale), scale = max|x| / 127


def _round_up(n: int, quantum: int = GROWTH_QUANTUM) -> int:
    return -(-n // quantum) * quantum


def capacity_for(positions: int, limit: int = 0) -> int:
    """Positions a ``SequenceKV`` allocates to hold ``positions`` (``limit``: the context)."""
    capacity = _round_up(max(1, positions))
    return min(capacity, _round_up(limit)) if limit else capacity


def bytes_per_position(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Keys and values of one position in every layer (int8: plus a bf16 scale per head)."""
    scale = 2 if dtype == torch.int8 else 0
    return layers * 2 * kv_heads * (head_dim * dtype.itemsize + scale)


class KVCache(Protocol):
    """What the prefix cache and the token loop need of a KV cache."""

    length: int  # positions held

    @property
    def reusable(self) -> int:
        """Leading positions another request may reuse."""

    @property
    def nbytes(self) -> int:
        """Bytes held, counting preallocated storage."""

    def prefix(self, length: int, room: int = 0, consume: bool = False) -> "KVCache":
        """A private copy of the first ``length`` positions, with room for ``room`` more
        (``consume``: this cache is not used after, so it may give its storage up)."""


class SequenceKV:
    """``data[layer][0|1, kv_head, position, head_dim]``: keys (0) and values (1) of the
    first ``length`` positions of one sequence, of which the first ``prefilled`` were
    computed as prompt positions (the only ones another request may reuse). For int8,
    ``scales[layer][0|1, kv_head, position]`` (bf16) goes with ``data``. One tensor per
    layer, so moving to larger storage (growth, or a request taking over a prefix-cache
    entry) holds both copies of one layer at a time, not of the whole cache."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 capacity: int = GROWTH_QUANTUM, limit: int = 0):
        if dtype not in KV_CACHE_DTYPES.values():
            raise ValueError(f"KV cache dtype {dtype} (choose one of {', '.join(KV_CACHE_DTYPES)})")
        self.limit = limit  # the model's context length: never allocate beyond it (0 = none)
        capacity = capacity_for(capacity, limit)
        self.data = [self._zeros((2, kv_heads, capacity, head_dim), dtype) for _ in range(layers)]
        self.scales = [self._zeros((2, kv_heads, capacity), torch.bfloat16) for _ in range(layers)] \
            if dtype == torch.int8 else None
        self.length = 0
        self.prefilled = 0

    @staticmethod
    def _zeros(shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # Zeroed, not empty: a prefill block attends over positions not written yet (masked;
        # 0 x garbage could be NaN).
        return torch.zeros(*shape, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.data[0].dtype

    @property
    def capacity(self) -> int:
        return self.data[0].shape[2]

    @property
    def attention_dtype(self) -> torch.dtype:
        """What ``keys``/``values`` return and attention computes in."""
        return torch.float32 if self.dtype == torch.float32 else torch.bfloat16

    @property
    def nbytes(self) -> int:
        tensors = self.data + (self.scales or [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def reusable(self) -> int:
        """Only positions computed as prompt positions: a generated position is rounded
        differently, and a cold request would compute it as a prompt position."""
        return self.prefilled

    def stored(self, length: int) -> Tuple[torch.Tensor, ...]:
        """What is stored for the first ``length`` positions (for comparing caches)."""
        parts = (torch.stack([d[:, :, :length] for d in self.data]),)
        return parts if self.scales is None else parts + (torch.stack([s[:, :, :length] for s in self.scales]),)

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` positions in total."""
        if positions <= self.capacity:
            return
        self._move_from(self, max(capacity_for(max(positions, 2 * self.capacity), self.limit), positions),
                        self.length, release=True)

    def _move_from(self, source: "SequenceKV", capacity: int, keep: int, release: bool) -> None:
        """This cache's storage: ``capacity`` positions holding ``source``'s first ``keep``,
        built a layer at a time; ``release``: each of ``source``'s layers is dropped once
        copied (``source`` is then empty)."""
        data, scales = [], None if source.scales is None else []
        for layer in range(len(source.data)):
            old = source.data[layer]
            new = self._zeros((*old.shape[:2], capacity, old.shape[3]), old.dtype)
            new[:, :, :keep] = old[:, :, :keep]
            data.append(new)
            if scales is not None:
                old_scales = source.scales[layer]
                scales.append(self._zeros((*old_scales.shape[:2], capacity), old_scales.dtype))
                scales[-1][:, :, :keep] = old_scales[:, :, :keep]
            if release:  # a new empty tensor: a zero-length view would keep the storage alive
                source.data[layer] = old.new_empty((*old.shape[:2], 0, old.shape[3]))
                if scales is not None:
                    source.scales[layer] = old_scales.new_empty((*old_scales.shape[:2], 0))
        self.data, self.scales = data, scales
        if release and source is not self:
            source.length = source.prefilled = 0

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``keys``/``values``: [positions, kv_heads, head_dim] for positions start, start+1, ..."""
        end = start + keys.shape[0]
        for part, rows in ((0, keys), (1, values)):
            rows = rows.transpose(0, 1)
            if self.scales is None:
                self.data[layer][part, :, start:end] = rows
            else:
                self.data[layer][part, :, start:end], self.scales[layer][part, :, start:end] = _to_int8(rows)

    def keys(self, layer: int, begin: int, end: int) -> torch.Tensor:
        """[kv_heads, end - begin, head_dim] in ``attention_dtype``: a view, or for int8 a copy."""
        return self._read(layer, 0, begin, end)

    def values(self, layer: int, begin: int, end: int) -> torch.Tensor:
        return self._read(layer, 1, begin, end)

    def _read(self, layer: int, part: int, begin: int, end: int) -> torch.Tensor:
        stored = self.data[layer][part, :, begin:end]
        if self.scales is None:
            return stored
        return stored.to(torch.bfloat16) * self.scales[layer][part, :, begin:end, None]

    def prefix(self, length: int, room: int = 0, consume: bool = False) -> "SequenceKV":
        """A private copy of the first ``length`` positions, with ``room`` for more to come,
        allocated once (0: as compact as the allocation quantum allows, for keeping).
        ``consume``: this cache is not needed after (a prefix-cache entry the request
        supersedes): its layers are freed as they are copied."""
        copy = SequenceKV.__new__(SequenceKV)
        copy.limit, copy.length, copy.prefilled = self.limit, length, min(length, self.prefilled)
        copy._move_from(self, capacity_for(length + room, self.limit), length, release=consume)
        return copy


def _to_int8(rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per (head, position) of ``rows`` [heads, positions, dim]: (values,
    bf16 scales). The scale is rounded to bf16 first, so values are quantized by the scale
    that is stored; an all-zero row keeps scale 0."""
    scales = (rows.abs().amax(dim=-1) / INT8_LEVELS).to(torch.bfloat16)
    divisor = scales.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return (rows / divisor).round().clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8), scales


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

    def prefix(self, length: int, room: int = 0, consume: bool = False) -> "HuggingFaceKV":
        """Copies of the first ``length`` positions in a new cache of the same kind (it grows
        by itself: ``room`` is not needed; ``consume`` changes nothing: each layer is cloned
        whole, and the source goes when its last reference does)."""
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
