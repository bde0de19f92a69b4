"""KV prefix reuse across requests: an agent chat resends its whole history every turn,
so the next prompt usually starts with the previous prompt and answer.

Entries are (token ids, KV cache: any ``engine.kv_cache.KVCache``, the lean runner's
``SequenceKV`` or a wrapped Hugging Face cache) of finished requests, kept LRU under a
byte budget. An entry keeps only its reusable positions, compacted (a sequence grown by
doubling can hold twice what it uses); the default budget holds at least one full
context of the served model (``default_budget_bytes``): a 7B model's KV is ~1 MiB a token
in fp32, so a fixed 1 GiB stopped reusing an agent chat past ~500 tokens.
A request takes the entry sharing the longest token prefix with its prompt and gets a
*copy* of that prefix: ipex-llm / bigdl-llm append to their caches in place (into
preallocated storage), so a stored entry is never handed out, only cloned, and is
never touched again after it is stored. An entry the prompt extends whole (the previous
turn of the same chat) is taken out of the cache instead, its storage freed as the
request's copy is built: the request's own entry supersedes it, and the KV budget need
not hold a chat's history twice. Reuse is exact by construction: the KV of a
token prefix depends on nothing but those tokens.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple

from fastchat_bigdl.engine.kv_cache import KVCache


MIN_BUDGET_BYTES = 1 << 30


def kv_bytes_per_token(config, element_bytes: int) -> int:
    """Bytes of keys and values one position takes in every layer."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * element_bytes


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget_bytes(bytes_per_token: int, context_len: int, memory_bytes: int, device: str = "cpu") -> int:
    """On CPU one full context of this model's KV, at least ``MIN_BUDGET_BYTES`` and at
    most a quarter of the machine's memory; on a GPU ``MIN_BUDGET_BYTES`` (the entries live
    in its memory, beside the weights)."""
    if device != "cpu":
        return MIN_BUDGET_BYTES
    return int(min(max(MIN_BUDGET_BYTES, bytes_per_token * context_len), memory_bytes // 4))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """LRU of finished requests' KV caches, bounded by ``budget_bytes``."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        # What the worker's KV budget leaves it now (``engine.kv_budget``); None: its own budget alone.
        self.room: Optional[Callable[[], int]] = None
        self._entries: "OrderedDict[int, Tuple[Tuple[int, ...], KVCache, int]]" = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, _, size in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, token_ids: Sequence[int], total_positions: int = 0) -> Tuple[Optional[KVCache], int]:
        """(a private copy of the longest cached prefix of ``token_ids``, its length);
        at least one token is always left to feed, so the model yields logits.
        ``total_positions``: how many the request may reach (prompt + new tokens), to
        allocate the copy's room once. An entry the prompt extends whole (an agent chat's
        previous turn) is taken out, not copied: the request's own entry will supersede
        it, and its storage is freed a layer at a time as the copy is built, so the chat
        never holds its history twice."""
        with self._lock:
            best_key, best_len = None, 0
            for key, (ids, _, _) in self._entries.items():
                n = common_prefix(ids, token_ids)
                if n > best_len:
                    best_key, best_len = key, n
            best_len = min(best_len, len(token_ids) - 1)
            if best_key is None or best_len < 1:
                self.misses += 1
                return None, 0
            ids, kv, _ = self._entries[best_key]
            consume = best_len == len(ids)  # the prompt extends it whole (``_superseded_by``)
            if consume:
                del self._entries[best_key]
            else:
                self._entries.move_to_end(best_key)
            self.hits += 1
            self.reused_tokens += best_len
        # Copying outside the lock: stored entries are immutable, eviction only drops a
        # reference, and a consumed entry is no longer reachable from the cache.
        return kv.prefix(best_len, room=max(0, total_positions - best_len), consume=consume), best_len

    def _superseded_by(self, token_ids: Sequence[int]) -> Optional[int]:
        """The key of the longest entry whose tokens all begin ``token_ids`` (with one more
        to feed): the one a request for ``token_ids`` takes out. Under the lock."""
        best_key, best_len = None, 0
        for key, (ids, _, _) in self._entries.items():
            if best_len < len(ids) < len(token_ids) and tuple(token_ids[:len(ids)]) == ids:
                best_key, best_len = key, len(ids)
        return best_key

    def put(self, token_ids: Sequence[int], kv: Optional[KVCache]) -> None:
        """Keep the KV of a finished request (``token_ids`` = the tokens it holds)."""
        if self.budget_bytes <= 0 or kv is None or kv.length != len(token_ids):
            return
        reusable = kv.reusable
        kv = kv.prefix(reusable)  # what can be reused, and no spare room
        size = kv.nbytes
        cap = self.budget_bytes if self.room is None else min(self.budget_bytes, self.room())
        if size > cap:
            return
        ids = tuple(token_ids[:reusable])
        with self._lock:
            # An entry that is a prefix of the new one is now redundant.
            for key in [k for k, (old, _, _) in self._entries.items() if ids[:len(old)] == old]:
                del self._entries[key]
            self._entries[self._next_key] = (ids, kv, size)
            self._next_key += 1
            self._evict_to(cap, keep=1)

    def _evict_to(self, nbytes: int, keep: int = 0, spare: Optional[int] = None) -> None:
        """Drop least recently used entries until at most ``nbytes`` are held (or ``keep``
        entries are left), not counting and not dropping the entry ``spare``."""
        total = sum(s for k, (_, _, s) in self._entries.items() if k != spare)
        for key in [k for k in self._entries if k != spare]:
            if total <= nbytes or len(self._entries) <= keep:
                break
            total -= self._entries.pop(key)[2]

    def shrink_to(self, nbytes: int, consumer: Sequence[int] = ()) -> int:
        """Room for a running request's KV (``engine.kv_budget``): the entries other than
        the one a request for ``consumer`` tokens will take out fit in ``nbytes``. Returns
        that entry's bytes (0 if none): they leave the cache when the request starts."""
        with self._lock:
            spare = self._superseded_by(consumer) if consumer else None
            self._evict_to(max(0, nbytes), spare=spare)
            return self._entries[spare][2] if spare is not None else 0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

