"""Memory admitted in bytes (``engine.kv_budget``): requests reserve the KV they can reach
before allocating it, wait in arrival order while the budget is full, push the prefix
cache's entries out, and one larger than the whole budget is refused with the numbers."""
import concurrent.futures
import functools

import pytest
import torch

from fastchat_bigdl.engine import kv_budget
from fastchat_bigdl.engine.kv_budget import KVBudget, NeverFits
from fastchat_bigdl.engine.scheduler import Engine
from fastchat_bigdl.engine.selection import choose_forward
from fastchat_bigdl.lowbit.backend import resolve_backend
from fastchat_bigdl.lowbit.loader import load_low_bit_model
from fastchat_bigdl.worker.generation import token_loop
from fastchat_bigdl.worker.prefix_cache import PrefixCache


class Entries:
    """A prefix cache as the budget sees it."""

    def __init__(self, sizes):
        self.sizes = list(sizes)

    @property
    def nbytes(self):
        return sum(self.sizes)

    def shrink_to(self, nbytes):
        while self.sizes and self.nbytes > nbytes:
            self.sizes.pop(0)


def test_reservations_fit_beside_each_other_and_push_the_cache_out():
    cache = Entries([30, 30])
    budget = KVBudget(100, cache=cache)
    assert budget.try_reserve(40)  # 40 + 60 cached = 100: nothing evicted
    assert cache.sizes == [30, 30]
    assert budget.try_reserve(25)  # the oldest entry goes
    assert cache.sizes == [30] and budget.reserved == 65
    assert not budget.try_reserve(40)  # running requests are never pushed out
    assert budget.peak <= 100 and budget.cache_room() == 35
    budget.release(40)
    assert budget.try_reserve(40) and budget.reserved == 65 and cache.sizes == [30]  # 95: it stays
    assert budget.try_reserve(35) and budget.reserved == 100 and cache.sizes == []
    with pytest.raises(NeverFits, match=r"needs 0.0 MiB .* whole budget .* --kv-budget-mb"):
        budget.check(101, "a request of 9 prompt tokens")


def test_available_memory_counts_cgroup_limits(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000 kB\nMemAvailable:  800 kB\n")
    root = tmp_path / "cgroup"
    own = tmp_path / "self_cgroup"
    own.write_text("0::/\n")
    root.mkdir()
    assert kv_budget.available_memory_bytes(meminfo, root, own) == 800 * 1024
    (root / "memory").mkdir()  # cgroup v1: unlimited is a huge number
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "memory" / "memory.usage_in_bytes").write_text("1000\n")
    assert kv_budget.available_memory_bytes(meminfo, root, own) == 800 * 1024
    group = root / "workers" / "one"
    group.mkdir(parents=True)
    own.write_text("0::/workers/one\n")
    (group / "memory.max").write_text("max\n")
    (root / "workers" / "memory.max").write_text(str(300 * 1024))  # a limit on an ancestor (v2)
    (root / "workers" / "memory.current").write_text(str(100 * 1024))
    assert kv_budget.available_memory_bytes(meminfo, root, own) == 200 * 1024
    assert kv_budget.default_kv_budget_bytes(10 << 30) == int(0.6 * (10 << 30))


def test_available_memory_counts_the_processs_own_v1_memory_cgroup(tmp_path):
    """cgroup v1 (Docker on older hosts, bench --memory-cgroup here): the limit is on the
    process's own group in the memory hierarchy, not on the hierarchy's root."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:  8000 kB\n")
    root, own = tmp_path / "cgroup", tmp_path / "self_cgroup"
    memory = root / "memory"
    group = memory / "bench" / "worker"
    group.mkdir(parents=True)
    own.write_text("5:devices:/\n4:memory:/bench/worker\n0::/\n")
    for directory, limit, usage in ((memory, 9223372036854771712, 5000), (memory / "bench", 6000 * 1024, 0),
                                    (group, 3000 * 1024, 1000 * 1024)):
        (directory / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (directory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    assert kv_budget.available_memory_bytes(meminfo, root, own) == 2000 * 1024  # its own group's room
    (group / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert kv_budget.available_memory_bytes(meminfo, root, own) == 6000 * 1024  # then the ancestor's


def test_mapped_weights_are_not_room_and_a_cgroups_reclaimable_cache_is(tmp_path):
    """Weights read through mmap are page cache the kernel counts as reclaimable, but the
    model touches all of them every token; other page cache in a cgroup can go."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:  8000 kB\n")
    root, own = tmp_path / "cgroup", tmp_path / "self_cgroup"
    root.mkdir()
    own.write_text("0::/\n")
    assert kv_budget.available_memory_bytes(meminfo, root, own, mapped_weights=3000 * 1024) == 5000 * 1024
    (root / "memory.max").write_text(str(6000 * 1024))  # v2: 4000 held, 2500 of it page cache, 500 shmem
    (root / "memory.current").write_text(str(4000 * 1024))
    (root / "memory.stat").write_text(f"anon {1500 * 1024}\nfile {2500 * 1024}\nshmem {500 * 1024}\n")
    assert kv_budget.available_memory_bytes(meminfo, root, own) == (6000 - 2000) * 1024
    assert kv_budget.available_memory_bytes(meminfo, root, own, mapped_weights=3000 * 1024) == 1000 * 1024
    (root / "memory.stat").write_text("anon 1\n")  # no page cache figures: all of it held
    assert kv_budget.available_memory_bytes(meminfo, root, own) == 2000 * 1024
    group = root / "memory"  # v1: total_cache / total_shmem
    group.mkdir()
    own.write_text("4:memory:/\n")
    (group / "memory.limit_in_bytes").write_text(str(6000 * 1024))
    (group / "memory.usage_in_bytes").write_text(str(4000 * 1024))
    (group / "memory.stat").write_text(f"cache 1\ntotal_cache {2500 * 1024}\ntotal_shmem {500 * 1024}\n")
    assert kv_budget.available_memory_bytes(meminfo, root, own, mapped_weights=1000 * 1024) == 3000 * 1024


def test_mapped_bytes_under_a_directory_come_from_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    weights = tmp_path / "cache" / "entry" / "low_bit_weights.safetensors"
    maps.write_text(f"7f0000000000-7f0000100000 r--s 00000000 08:01 12 {weights}\n"
                    "7f0000200000-7f0000300000 r-xp 00000000 08:01 13 /usr/lib/libc.so.6\n"
                    f"7f0000400000-7f0000402000 r--s 00100000 08:01 12 {weights}\n"
                    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n")
    assert kv_budget.mapped_bytes_under(tmp_path / "cache", maps) == 0x100000 + 0x2000
    assert kv_budget.mapped_bytes_under(tmp_path / "elsewhere", maps) == 0


def test_weights_loaded_from_the_low_bit_cache_stay_mapped(tiny_llama, tmp_path):
    """The premise of counting them: a cache hit maps the weights file (page cache) rather
    than copying it into anonymous memory."""
    import gc

    from fastchat_bigdl.lowbit.weights_cache import LowBitCache

    cache = LowBitCache(tmp_path / "low-bit")
    load_low_bit_model(str(tiny_llama), torch_dtype=torch.float32, cache=cache)  # converts and saves
    gc.collect()
    model, _ = load_low_bit_model(str(tiny_llama), torch_dtype=torch.float32, cache=cache)  # a hit
    stored = sum(f.stat().st_size for f in (tmp_path / "low-bit").rglob("*.safetensors"))
    assert stored > 0 and kv_budget.mapped_bytes_under(tmp_path / "low-bit") >= 0.9 * stored
    del model


@pytest.fixture(scope="module")
def lean(tiny_llama):
    backend = resolve_backend()
    model, tokenizer = load_low_bit_model(str(tiny_llama), torch_dtype=torch.float32, backend=backend)
    runner, line = choose_forward(model, backend, "cpu", prefill_recipe="kernel")
    assert runner is not None, line
    return model, tokenizer, runner


def prompt(i: int) -> str:
    return " ".join(f"word{(i * 7 + j) % 50} fox" for j in range(60))


def test_a_flood_waits_for_memory_and_every_answer_is_the_one_it_gets_alone(lean):
    """Six requests, a budget for two at a time: all finish, in the same tokens as alone,
    the budget never exceeded, the prefix cache squeezed to make room, nothing left held."""
    model, tokenizer, runner = lean
    params = [{"prompt": prompt(i), "temperature": 0, "max_new_tokens": 40, "echo": False} for i in range(6)]
    engine = Engine(runner=runner)
    cache = PrefixCache(1 << 30)
    loop = engine.streamer(functools.partial(token_loop, prefix_cache=cache, runner=runner))

    def run(p):
        *_, last = loop(model, tokenizer, p, "cpu", 256, 1)
        return last["text"]

    alone = [run(p) for p in params]
    need = max(runner.kv_bytes(len(tokenizer(p["prompt"]).input_ids) + 40) for p in params)
    assert len(cache) > 0
    budget = engine.kv_budget = KVBudget(int(2.5 * need), cache=cache)
    cache.room = budget.cache_room
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        flooded = list(pool.map(run, params))
    assert flooded == alone
    assert budget.granted == 6 and budget.waited >= 1 and budget.reserved == 0
    assert budget.peak <= budget.total and cache.nbytes <= budget.total


def test_a_request_larger_than_the_whole_budget_is_refused_and_the_next_one_runs(lean):
    model, tokenizer, runner = lean
    engine = Engine(runner=runner)
    engine.kv_budget = KVBudget(runner.kv_bytes(64))
    loop = engine.streamer(functools.partial(token_loop, runner=runner))
    with pytest.raises(NeverFits, match=r"a request of \d+ prompt tokens and up to 100 new ones needs"):
        list(loop(model, tokenizer, {"prompt": prompt(1), "max_new_tokens": 100, "temperature": 0}, "cpu", 256, 1))
    *_, last = loop(model, tokenizer, {"prompt": "the fox", "max_new_tokens": 8, "temperature": 0}, "cpu", 256, 1)
    assert last["finish_reason"] in ("stop", "length") and engine.kv_budget.reserved == 0


def test_a_reservation_granted_to_a_stream_whose_client_left_is_given_back():
    from fastchat_bigdl.engine.requests import Reserve
    from fastchat_bigdl.engine.scheduler import _Stream

    engine = Engine(inline=True)
    engine.kv_budget = budget = KVBudget(100)
    stream = _Stream(lambda: iter(()), batched=True)
    stream.request = Reserve(60)
    engine._grant_reservations([stream])
    assert budget.reserved == 60 and stream.request is None  # granted, not yet delivered
    engine._close(stream)  # the client went away before the loop's next turn
    assert budget.reserved == 0
