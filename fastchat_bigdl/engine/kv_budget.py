"""Memory admitted in bytes: the KV caches a worker holds (running requests' and the
prefix cache's) stay within one budget, so a flood of long requests waits instead of
growing the process until the kernel's OOM killer ends it.

A request reserves the bytes its KV cache can reach (prompt + ``max_new_tokens``
positions, allocated once by the lean runner) before it allocates anything; the engine
grants reservations in arrival order (a large request is not starved by smaller ones
behind it), evicting prefix-cache entries (least recently used first) to make room; a
request that does not fit waits in the queue, and one larger than the whole budget is
refused at once with the numbers (``NeverFits``). The default budget is a share of the
memory available when the worker has loaded its model (``default_kv_budget_bytes``,
counting a cgroup's limit and the weights' mapped pages); the worker serves no longer a
context than the budget holds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

AVAILABLE_SHARE = 0.6  # of the memory available after loading: the rest for activations, logits, the runtime
MIN_BUDGET_BYTES = 64 << 20


class NeverFits(Exception):
    """A request whose KV cache alone exceeds the worker's whole budget. Deliberately not
    a ValueError: FastChat's worker answers those as a network error."""


class Evictable(Protocol):
    """The prefix cache, as the budget sees it."""

    @property
    def nbytes(self) -> int: ...

    def shrink_to(self, nbytes: int, consumer: Sequence[int] = ()) -> int: ...


@dataclass
class KVBudget:
    total: int
    cache: Optional[Evictable] = None
    reserved: int = 0  # by running requests
    peak: int = 0  # largest reserved + cached seen
    granted: int = 0
    waited: int = 0  # reservations that could not be granted at once

    @property
    def cached(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def check(self, nbytes: int, what: str) -> None:
        if nbytes > self.total:
            raise NeverFits(f"{what} needs {_mib(nbytes)} of KV cache, more than this worker's whole budget of "
                            f"{_mib(self.total)}; ask for fewer tokens (max_tokens) or start the worker with a "
                            f"larger --kv-budget-mb")

    def try_reserve(self, nbytes: int, consumer: Sequence[int] = ()) -> bool:
        """Reserve ``nbytes`` if they fit beside the running requests, evicting prefix-cache
        entries as needed; False if they do not fit yet. ``consumer``: the request's
        prompt tokens; the cache entry it will take out (its previous turn) is spared and
        not counted, as the request frees it while building its own KV."""
        if self.reserved + nbytes > self.total:
            return False
        taken_out = 0
        if self.cache is not None and self.reserved + nbytes + self.cached > self.total:
            taken_out = self.cache.shrink_to(self.total - self.reserved - nbytes, consumer)
        self.reserved += nbytes
        self.granted += 1
        self.peak = max(self.peak, self.reserved + self.cached - taken_out)
        return True

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes

    def cache_room(self) -> int:
        """What the prefix cache may hold now."""
        return max(0, self.total - self.reserved)

    def stats(self) -> dict:
        return {"budget_bytes": self.total, "reserved_bytes": self.reserved, "cached_bytes": self.cached,
                "peak_bytes": self.peak, "granted": self.granted, "waited": self.waited}


class Reservation:
    """Granted bytes, given back once by ``release`` (``budget`` None: nothing was held)."""

    def __init__(self, budget: Optional[KVBudget], nbytes: int):
        self.budget, self.nbytes = budget, nbytes

    def release(self) -> None:
        if self.budget is not None:
            self.budget.release(self.nbytes)
            self.budget = None


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class _CgroupFiles:
    limit: str
    usage: str
    file_keys: tuple  # memory.stat keys: (page cache, of which shared memory: not reclaimable)


_V2 = _CgroupFiles("memory.max", "memory.current", ("file", "shmem"))
_V1 = _CgroupFiles("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_cache", "total_shmem"))


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                           own_cgroup: Path = Path("/proc/self/cgroup"), mapped_weights: int = 0) -> int:
    """Memory this process may still take: the kernel's MemAvailable, or less where a
    memory cgroup limit (v2 on this process's group or an ancestor; v1 likewise) leaves
    less, minus ``mapped_weights``: weights read through mmap are page cache, which both
    count as reclaimable, yet the model touches every page of them for every token (left
    out, the budget admits KV into their room, and the kernel must evict and re-read
    weights to hold it). A cgroup's reclaimable page cache is counted as room: only the
    weights need to stay."""
    available = _host_available(meminfo)
    for level, files in _cgroup_limits(cgroup_root, own_cgroup):
        try:
            limit = (level / files.limit).read_text().strip()
            if limit == "max":
                continue
            held = int((level / files.usage).read_text()) - _reclaimable_cache(level / "memory.stat", files)
            available = min(available, int(limit) - held)
        except (OSError, ValueError):
            continue
    return max(0, available - mapped_weights)


def _host_available(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _reclaimable_cache(stat: Path, files: _CgroupFiles) -> int:
    """A cgroup's page cache that is not shared memory (0 where memory.stat is unreadable)."""
    try:
        values = dict(line.split() for line in stat.read_text().splitlines() if line.count(" ") == 1)
        cache, shmem = (int(values.get(key, 0)) for key in files.file_keys)
    except (OSError, ValueError):
        return 0
    return max(0, cache - shmem)


def mapped_bytes_under(directory: Path, maps: Path = Path("/proc/self/maps")) -> int:
    """Bytes this process maps from files under ``directory`` (the low-bit weights cache)."""
    prefix = str(Path(directory).resolve()) + "/"
    total = 0
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            total += end - start
    return total


def _cgroup_limits(root: Path, own: Path):
    """(directory, files) of every memory cgroup that bounds this process: its own group
    and each ancestor, in the v1 memory hierarchy (``N:memory:/path``) and in v2
    (``0::/path``)."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        lines = []
    levels = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if controllers == "":  # v2
            top, files = root, _V2
        elif "memory" in controllers.split(","):  # v1
            top, files = root / "memory", _V1
        else:
            continue
        group = top / path.strip().lstrip("/")
        for level in [group, *group.parents]:
            levels.append((level, files))
            if level == top:
                break
    return levels


def default_kv_budget_bytes(available: int) -> int:
    return max(MIN_BUDGET_BYTES, int(available * AVAILABLE_SHARE))
