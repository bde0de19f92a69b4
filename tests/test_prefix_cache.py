"""KV prefix reuse: exactly the same output as without it, and no sharing of state."""
import threading

import pytest
import torch

from fastchat_bigdl.worker.generation import generate_stream
from fastchat_bigdl.engine.kv_cache import HuggingFaceKV
from fastchat_bigdl.worker.prefix_cache import PrefixCache
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
    keys = [k for k, _ in stored.layers()]
    snapshot = [k.clone() for k in keys]
    storage = [k.untyped_storage().data_ptr() for k in keys]
    for i in range(3):  # continue the same prefix several ways
        final(model, tokenizer, prompt + f" and {i}", cache)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, keys))
    taken, n = cache.take(tokenizer(prompt + " again").input_ids)
    assert n > 0 and all(k.untyped_storage().data_ptr() not in storage for k, _ in taken.layers())


def test_a_hugging_face_prefix_copies_exactly_the_first_positions(low_bit):
    model, tokenizer = low_bit
    ids = torch.as_tensor([tokenizer("hello world how are you").input_ids])
    with torch.inference_mode():
        kv = HuggingFaceKV(model(ids, use_cache=True).past_key_values)
    part = kv.prefix(3)
    assert part.length == 3 and kv.length == ids.shape[1] and type(part.cache) is type(kv.cache)
    assert torch.equal(part.layers()[0][0], kv.layers()[0][0][..., :3, :])
    assert part.layers()[0][0].untyped_storage().data_ptr() != kv.layers()[0][0].untyped_storage().data_ptr()


def FakeKV(n, width):
    """A one-layer legacy (tuple) Hugging Face cache of ``n`` positions, for the LRU
    bookkeeping tests."""
    return HuggingFaceKV(((torch.zeros(1, 1, n, width), torch.zeros(1, 1, n, width)),))


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
                assert n == 0 or kv.length == n
                cache.put(ids, FakeKV(4, 256))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and cache.nbytes <= cache.budget_bytes


def test_the_default_budget_holds_one_full_context_of_the_model():
    """A fixed 1 GiB held ~500 tokens of a 7B model's fp32 KV (1 MiB a token): agent chats
    stopped reusing their history past that and every later turn re-prefilled it. Sizes
    are in bytes of the cache's own element type."""
    from types import SimpleNamespace

    from fastchat_bigdl.worker.prefix_cache import default_budget_bytes, kv_bytes_per_token

    llama_7b = SimpleNamespace(num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                               num_hidden_layers=32)
    smollm_135m = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                                  num_hidden_layers=30)
    fp32, bf16 = kv_bytes_per_token(llama_7b, 4), kv_bytes_per_token(llama_7b, 2)
    assert fp32 == 1 << 20 and bf16 == 1 << 19
    assert default_budget_bytes(fp32, 4096, 24 << 30) == 4 << 30  # the whole context
    assert default_budget_bytes(bf16, 4096, 24 << 30) == 2 << 30  # half the bytes in bf16
    assert default_budget_bytes(fp32, 4096, 8 << 30) == 2 << 30  # at most a quarter of the machine
    assert default_budget_bytes(kv_bytes_per_token(smollm_135m, 4), 8192, 24 << 30) == 1 << 30  # at least 1 GiB
    assert default_budget_bytes(fp32, 4096, 24 << 30, device="xpu") == 1 << 30  # beside the weights on the GPU


def test_a_lean_entry_keeps_only_its_reusable_positions():
    """A sequence grown by doubling to 1152 positions while using 553 is stored in 576
    (the allocation quantum), so a budget of 600 positions keeps it; generated positions
    (not reusable) are not kept either."""
    from fastchat_bigdl.engine.kv_cache import SequenceKV

    kv = SequenceKV(layers=2, kv_heads=1, head_dim=8, dtype=torch.float32)
    kv.reserve(553)
    kv.reserve(600)
    assert kv.capacity == 1152
    for layer in kv.data:
        layer[:, :, :553] = torch.randn(2, 1, 553, 8)
    kv.length, kv.prefilled = 553, 540  # 13 generated positions
    per_position = 2 * 2 * 1 * 8 * 4
    cache = PrefixCache(budget_bytes=600 * per_position)
    assert kv.nbytes > cache.budget_bytes
    ids = list(range(3, 556))
    cache.put(ids, kv)
    assert len(cache) == 1 and cache.nbytes == 576 * per_position
    taken, n = cache.take(ids + [9])
    assert n == 540 and torch.equal(taken.stored(540)[0], kv.stored(540)[0])


def test_a_reused_lean_prefix_is_allocated_once_for_the_whole_request():
    """Room for the prompt's rest and the new tokens comes with the copy: a 7B agent turn
    (802 reused, 83 to prefill, 32 to generate) held 1792 positions after doubling, 1.75 GiB
    of KV, for 917 used."""
    from fastchat_bigdl.engine.kv_cache import SequenceKV

    kv = SequenceKV(layers=1, kv_heads=1, head_dim=4, dtype=torch.float32, capacity=832)
    kv.length = kv.prefilled = 802
    cache = PrefixCache(budget_bytes=1 << 30)
    ids = list(range(802))
    cache.put(ids, kv)
    taken, n = cache.take(ids + list(range(900, 983)), total_positions=885 + 32)
    assert n == 802 and taken.capacity == 960  # 917 rounded up to the allocation quantum
    for position in range(n, 917):  # the request fills it without growing
        taken.reserve(position + 1)
    assert taken.capacity == 960
