"""KV prefix reuse across requests: an agent chat resends its whole history every turn,
so the next prompt usually starts with the previous prompt and answer.

Entries are (token ids, KV cache: the lean runner's ``SequenceKV`` or a Hugging Face
cache) of finished requests, kept LRU under a byte budget. A lean-runner entry keeps only
its reusable positions, compacted (a sequence grown by doubling can hold twice what it
uses); the default budget holds at least one full context of the served model
(``default_budget_mb``): a 7B model's KV is ~1 MiB a token in fp32, so a fixed 1 GiB
stopped reusing an agent chat past ~500 tokens.
A request takes the entry sharing the longest token prefix with its prompt and gets a
*copy* of that prefix: ipex-llm / bigdl-llm append to their caches in place (into
preallocated storage), so a stored entry is never handed out, only cloned, and is
never touched again after it is stored. Reuse is exact by construction: the KV of a
token prefix depends on nothing but those tokens.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

from fastchat_bigdl.engine.kv_cache import SequenceKV


def kv_layers(kv):
    """(keys, values) per layer for DynamicCache-style and legacy tuple caches."""
    if hasattr(kv, "key_cache"):
        return list(zip(kv.key_cache, kv.value_cache))
    return [(layer[0], layer[1]) for layer in kv]


def cache_length(kv) -> int:
    if isinstance(kv, SequenceKV):
        return kv.length
    layers = kv_layers(kv)
    return layers[0][0].shape[-2] if layers else 0


def cache_reusable(kv) -> int:
    """Leading positions another request may reuse: for the lean runner only those it
    computed as prompt positions (a generated position is rounded differently, and a
    cold request would compute it as a prompt position)."""
    return kv.prefilled if isinstance(kv, SequenceKV) else cache_length(kv)


def cache_nbytes(kv) -> int:
    """Bytes held, counting preallocated storage (each storage once)."""
    if isinstance(kv, SequenceKV):
        return kv.nbytes
    seen, total = set(), 0
    for keys, values in kv_layers(kv):
        for t in (keys, values):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def cache_prefix(kv, length: int, room: int = 0):
    """A new cache of the same kind holding copies of the first ``length`` positions (a
    lean one with ``room`` for the positions the request will add: allocated once, not
    grown by doubling, which at 7B is a GiB of KV more than needed)."""
    if isinstance(kv, SequenceKV):
        return kv.prefix(length, room=room) if room else kv.prefix(length)
    layers = [(k[..., :length, :].clone(), v[..., :length, :].clone()) for k, v in kv_layers(kv)]
    if not hasattr(kv, "key_cache"):
        return tuple(layers)
    copy = type(kv)()
    copy.key_cache = [k for k, _ in layers]
    copy.value_cache = [v for _, v in layers]
    for counter in ("_seen_tokens", "seen_tokens"):  # transformers 4.39+ / 4.37
        if hasattr(copy, counter):
            setattr(copy, counter, length)
    return copy


MIN_BUDGET_MB = 1024


def kv_bytes_per_token(config) -> int:
    """Bytes of fp32 keys and values one position takes in every layer."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * 4


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget_mb(config, context_len: int, memory_bytes: int, device: str = "cpu") -> int:
    """On CPU one full context of this model's KV, at least ``MIN_BUDGET_MB`` and at most a
    quarter of the machine's memory; on a GPU ``MIN_BUDGET_MB`` (the entries live in its
    memory, beside the weights)."""
    if device != "cpu":
        return MIN_BUDGET_MB
    full_context = kv_bytes_per_token(config) * context_len >> 20
    return int(min(max(MIN_BUDGET_MB, full_context), memory_bytes // 4 >> 20))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """LRU of finished requests' KV caches, bounded by ``budget_bytes``."""

    def __init__(self, budget_bytes: int, min_reuse: int = 1):
        self.budget_bytes = budget_bytes
        self.min_reuse = min_reuse
        self._entries: "OrderedDict[int, Tuple[Tuple[int, ...], object, int]]" = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, _, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, token_ids: Sequence[int], total_positions: int = 0) -> Tuple[Optional[object], int]:
        """(a private copy of the longest cached prefix of ``token_ids``, its length);
        at least one token is always left to feed, so the model yields logits.
        ``total_positions``: how many the request may reach (prompt + new tokens), to
        allocate the copy's room once."""
        with self._lock:
            best_key, best_len = None, 0
            for key, (ids, _, _) in self._entries.items():
                n = common_prefix(ids, token_ids)
                if n > best_len:
                    best_key, best_len = key, n
            best_len = min(best_len, len(token_ids) - 1)
            if best_key is None or best_len < self.min_reuse:
                self.misses += 1
                return None, 0
            self._entries.move_to_end(best_key)
            kv = self._entries[best_key][1]
            self.hits += 1
            self.reused_tokens += best_len
        # Cloning outside the lock: stored entries are immutable, eviction only drops a reference.
        return cache_prefix(kv, best_len, max(0, total_positions - best_len)), best_len

    def put(self, token_ids: Sequence[int], kv) -> None:
        """Keep the KV of a finished request (``token_ids`` = the tokens it holds)."""
        if self.budget_bytes <= 0 or kv is None or cache_length(kv) != len(token_ids):
            return
        reusable = cache_reusable(kv)
        if isinstance(kv, SequenceKV):  # keep what can be reused, and no spare room
            kv = kv.prefix(reusable, room=0)
        size = cache_nbytes(kv)
        if size > self.budget_bytes:
            return
        ids = tuple(token_ids[:reusable])
        with self._lock:
            # An entry that is a prefix of the new one is now redundant.
            for key in [k for k, (old, _, _) in self._entries.items() if ids[:len(old)] == old]:
                del self._entries[key]
            self._entries[self._next_key] = (ids, kv, size)
            self._next_key += 1
            total = sum(s for _, _, s in self._entries.values())
            while total > self.budget_bytes and len(self._entries) > 1:
                _, (_, _, evicted) = self._entries.popitem(last=False)
                total -= evicted

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.nbytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens}

