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

    def shrink_to(self, nbytes, consumer=()):
        while self.sizes and self.nbytes > nbytes:
            self.sizes.pop(0)
        return 0


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


def test_a_chat_whose_history_the_budget_cannot_hold_twice_still_reuses_its_prefix(lean):
    """Turn 2 extends turn 1's prompt. With a budget below turn 1's entry plus
    turn 2's KV, making room used to evict that entry and prefill the whole history again
    (a 7B chat in an 8 GiB cgroup: 114 s instead of ~30 s). Now turn 2 takes the entry out
    (freeing it as its own KV is built): it reuses the prefix, answers as it does without a
    cache, and the budget's accounting never passes its total."""
    model, tokenizer, runner = lean
    engine = Engine(runner=runner)
    cache = PrefixCache(1 << 30)
    loop = engine.streamer(functools.partial(token_loop, prefix_cache=cache, runner=runner))
    plain = engine.streamer(functools.partial(token_loop, runner=runner))

    def run(stream, text):
        *_, last = stream(model, tokenizer, {"prompt": text, "temperature": 0, "max_new_tokens": 24}, "cpu", 256, 1)
        return last["text"]

    first = " ".join(f"word{j} fox" for j in range(16))
    run(loop, first)
    second = first + " " + " ".join(f"word{j} fox" for j in range(30, 40))  # the next turn
    assert len(tokenizer(second).input_ids) + 24 < 256  # no truncation to the tiny context
    entry = cache.nbytes
    need = runner.kv_bytes(len(tokenizer(second).input_ids) + 24)
    assert entry > 0 and len(cache) == 1
    budget = engine.kv_budget = KVBudget(need + entry // 2, cache=cache)  # not both at once
    cache.room = budget.cache_room
    hits, reused = cache.hits, cache.reused_tokens
    answer = run(loop, second)
    assert cache.hits == hits + 1 and cache.reused_tokens - reused >= len(tokenizer(first).input_ids) - 1
    assert budget.peak <= budget.total and budget.reserved == 0
    assert len(cache) == 1 and cache.nbytes > entry  # turn 2's entry replaced turn 1's
    assert answer == run(plain, second)  # reuse is exact


def sequence(n):
    """A lean KV cache of ``n`` prompt positions with random contents."""
    from fastchat_bigdl.engine.kv_cache import SequenceKV

    kv = SequenceKV(layers=3, kv_heads=1, head_dim=4, dtype=torch.bfloat16, capacity=n)
    for layer in range(3):
        kv.write(layer, 0, torch.randn(n, 1, 4), torch.randn(n, 1, 4))
    kv.length = kv.prefilled = n
    return kv


def test_a_taken_out_entry_is_freed_a_layer_at_a_time_and_a_shared_one_is_cloned():
    cache = PrefixCache(1 << 20)
    chat = list(range(100, 164))
    cache.put(chat, sequence(64))
    other = list(range(100, 132)) + [7] * 40  # shares 32 tokens with it, then differs
    cloned, n = cache.take(other, total_positions=80)
    assert n == 32 and len(cache) == 1  # a shared prefix is copied; the entry stays
    (_, entry, _), = cache._entries.values()
    expected = entry.stored(64)
    taken, n = cache.take(chat + [1, 2, 3], total_positions=96)
    assert n == 64 and len(cache) == 0  # the chat's own next turn takes it out
    assert taken.capacity >= 96 and torch.equal(taken.stored(64)[0], expected[0])
    assert entry.nbytes == 0  # its storage went as the copy was built
    assert all(layer.untyped_storage().nbytes() == 0 for layer in entry.data)  # freed, not a view of it
    assert torch.equal(cloned.stored(32)[0], expected[0][:, :, :, :32])


def test_the_budget_spares_the_entry_a_request_takes_out():
    """Room for a chat's next turn: other entries go first, the previous turn's entry
    stays (counted once, as the request's: it frees it while building its own KV)."""
    cache = PrefixCache(1 << 20)
    cache.put(list(range(500, 564)), sequence(64))  # another chat, least recently used
    chat = list(range(100, 164))
    cache.put(chat, sequence(64))
    entry = cache.nbytes // 2
    budget = KVBudget(3 * entry, cache=cache)
    assert budget.try_reserve(2 * entry + 1, consumer=chat + [1, 2])  # the other chat's entry must go
    assert [ids[0] for ids, _, _ in cache._entries.values()] == [100] and budget.peak == 2 * entry + 1
    taken, n = cache.take(chat + [1, 2], total_positions=66)
    assert n == 64 and len(cache) == 0
    budget.release(2 * entry + 1)
    assert budget.try_reserve(3 * entry) and not budget.try_reserve(1)  # what a request can never exceed
