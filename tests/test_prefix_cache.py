"""KV prefix reuse: exactly the same output as without it, and no sharing of state."""
import threading

import pytest
import torch

from fastchat_bigdl.worker.generation import generate_stream
from fastchat_bigdl.worker.prefix_cache import PrefixCache, cache_length, cache_prefix, kv_layers
from fastchat_bigdl.lowbit.loader import load_low_bit_model

pytestmark = pytest.mark.backend


@pytest.fixture(scope="module")
def low_bit(tiny_llama):
    return load_low_bit_model(str(tiny_llama), torch_dtype=torch.float32)


def final(model, tokenizer, prompt, cache, max_new_tokens=12):
    params = {"prompt": prompt, "temperature": 0, "max_new_tokens": max_new_tokens, "echo": False}
    *_, last = generate_stream(model, tokenizer, params, "cpu", 256, 2, prefix_cache=cache)
    return last


def conversation(model, tokenizer, cache, opening, turns=4):
    """A growing chat: each prompt is the previous prompt + answer + a new user line."""
    prompt, answers = opening, []
    for turn in range(turns):
        out = final(model, tokenizer, prompt, cache)
        answers.append(out["text"])
        prompt = prompt + out["text"] + f" user: tell me more {turn} assistant:"
    return answers


def test_multi_turn_greedy_outputs_are_identical_with_and_without_reuse(low_bit):
    model, tokenizer = low_bit
    cache = PrefixCache(64 << 20)
    opening = "user: hello world how are you today assistant:"
    assert conversation(model, tokenizer, cache, opening) == conversation(model, tokenizer, None, opening)
    assert cache.hits >= 3 and cache.reused_tokens > 0


def test_a_different_conversation_only_reuses_what_it_really_shares(low_bit):
    model, tokenizer = low_bit
    cache = PrefixCache(64 << 20)
    conversation(model, tokenizer, cache, "user: the quick brown fox assistant:", turns=2)
    reused_before = cache.reused_tokens
    other = "one two three four five six"
    ids = tokenizer(other).input_ids
    got = final(model, tokenizer, other, cache)
    shared = cache.reused_tokens - reused_before
    assert shared <= 1  # at most a BOS token in common
    assert got == final(model, tokenizer, other, None)
    assert len(ids) > 1


def test_a_stored_entry_is_never_mutated_by_later_requests(low_bit):
    model, tokenizer = low_bit
    cache = PrefixCache(64 << 20)
    prompt = "user: hello world how are you today assistant:"
    final(model, tokenizer, prompt, cache)
    (_, stored, _), = cache._entries.values()
    keys = [k for k, _ in kv_layers(stored)]
    snapshot = [k.clone() for k in keys]
    storage = [k.untyped_storage().data_ptr() for k in keys]
    for i in range(3):  # continue the same prefix several ways
        final(model, tokenizer, prompt + f" and {i}", cache)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, keys))
    taken, n = cache.take(tokenizer(prompt + " again").input_ids)
    assert n > 0 and all(k.untyped_storage().data_ptr() not in storage for k, _ in kv_layers(taken))


def test_cache_prefix_copies_exactly_the_first_positions(low_bit):
    model, tokenizer = low_bit
    ids = torch.as_tensor([tokenizer("hello world how are you").input_ids])
    with torch.inference_mode():
        kv = model(ids, use_cache=True).past_key_values
    part = cache_prefix(kv, 3)
    assert cache_length(part) == 3 and type(part) is type(kv)
    assert torch.equal(kv_layers(part)[0][0], kv_layers(kv)[0][0][..., :3, :])


def FakeKV(n, width):
    """A one-layer legacy (tuple) cache of ``n`` positions, for the LRU bookkeeping tests."""
    return ((torch.zeros(1, 1, n, width), torch.zeros(1, 1, n, width)),)


def test_lru_stays_within_the_byte_budget():
    size = 2 * 4 * 128 * 4  # keys + values, 4 positions x 128 floats
    cache = PrefixCache(budget_bytes=3 * size)
    for i in range(5):
        cache.put([100 + i, 1, 2, 3], FakeKV(4, 128))
    assert len(cache) == 3 and cache.nbytes == 3 * size
    assert cache.take([100, 1, 2, 3, 9])[1] == 0  # the oldest were evicted
    assert cache.take([104, 1, 2, 3, 9])[1] == 4


def test_an_entry_extended_by_the_next_turn_replaces_the_shorter_one():
    cache = PrefixCache(1 << 20)
    cache.put([1, 2, 3], FakeKV(3, 64))
    cache.put([1, 2, 3, 4, 5], FakeKV(5, 64))
    assert len(cache) == 1 and cache.take([1, 2, 3, 4, 5, 6])[1] == 5


def test_at_least_one_token_is_left_to_feed():
    cache = PrefixCache(1 << 20)
    cache.put([1, 2, 3], FakeKV(3, 64))
    assert cache.take([1, 2, 3])[1] == 2


def test_concurrent_take_and_put_are_safe():
    cache = PrefixCache(budget_bytes=50 * 4096)
    errors = []

    def worker(seed):
        try:
            for i in range(200):
                ids = [seed, i % 7, 3, 4]
                kv, n = cache.take(ids + [9])
                assert n == 0 or kv[0][0].shape[-2] == n
                cache.put(ids, FakeKV(4, 256))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and cache.nbytes <= cache.budget_bytes
