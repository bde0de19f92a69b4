"""The worker's token loop: stops, sampling parameters, echo/logprobs, streaming decode."""
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from fastchat_bigdl.lowbit.devices import use_physical_cores
from fastchat_bigdl.engine.scheduler import Engine
from fastchat_bigdl.common.stop_strings import StopMatcher
from fastchat_bigdl.worker.generation import generate_stream, token_loop
from fastchat_bigdl.worker.output_stream import IncrementalDecoder


class ScriptedLM:
    """Emits a fixed token script (or fixed logits), keeping a real-shaped tuple KV cache."""

    def __init__(self, vocab, script=None, logits=None, eos=1):
        self.vocab, self.script, self.fixed, self.calls, self.eos = vocab, script or [], logits, 0, eos
        self.config = SimpleNamespace(vocab_size=vocab)

    def __call__(self, input_ids, past_key_values=None, use_cache=True):
        n = input_ids.shape[1]
        old = past_key_values[0][0].shape[2] if past_key_values else 0
        kv = ((torch.zeros(1, 1, old + n, 1), torch.zeros(1, 1, old + n, 1)),)
        logits = torch.full((1, n, self.vocab), -10.0)
        if self.fixed is not None:
            logits[0, -1] = self.fixed
        else:
            logits[0, -1, self.script[self.calls] if self.calls < len(self.script) else self.eos] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits, past_key_values=kv)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(str(tiny_llama))


def run(tok, script_text=None, *, script=None, logits=None, **params):
    ids = script if script is not None or script_text is None else tok(script_text, add_special_tokens=False).input_ids
    model = ScriptedLM(len(tok), ids, logits, eos=tok.eos_token_id)  # EOS once the script ends
    base = {"prompt": "hello", "temperature": 0, "max_new_tokens": 64, "echo": False}
    base.update(params)
    return list(generate_stream(model, tok, base, "cpu", 4096, stream_interval=1))


def test_stop_string_spanning_tokens_is_cut_and_never_partially_emitted(tok):
    assert len(tok("STOP", add_special_tokens=False).input_ids) > 1  # really spans tokens
    chunks = run(tok, "hello world STOP and more", stop=["STOP"])
    assert chunks[-1]["text"] == "hello world " and chunks[-1]["finish_reason"] == "stop"
    for chunk in chunks:
        assert "S" not in chunk["text"]  # no partial stop ever reached the client
        assert "hello world ".startswith(chunk["text"])


def test_the_earliest_of_several_stops_wins(tok):
    chunks = run(tok, "one two three four", stop=["four", "two", "zzz"])
    assert chunks[-1]["text"] == "one " and chunks[-1]["finish_reason"] == "stop"


def test_text_resembling_a_stop_prefix_is_released_when_it_is_not_one(tok):
    chunks = run(tok, "the STAR is bright", stop=["STOP"], max_new_tokens=30)
    assert chunks[-1]["text"] == "the STAR is bright"


def test_stop_token_ids_and_eos_end_the_answer_without_their_text(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("yes it is", add_special_tokens=False).input_ids
    assert run(tok, script=ids + [im_end, 5, 6], stop_token_ids=[im_end])[-1] == {
        "text": "yes it is", "logprobs": None, "finish_reason": "stop",
        "usage": {"prompt_tokens": len(tok("hello").input_ids), "completion_tokens": len(ids) + 1,
                  "total_tokens": len(tok("hello").input_ids) + len(ids) + 1}}
    assert run(tok, script=ids + [tok.eos_token_id, 5])[-1]["text"] == "yes it is"


def test_max_tokens_is_exact_and_finishes_with_length(tok):
    last = run(tok, "one two three four five six seven eight", max_new_tokens=5)[-1]
    assert last["usage"]["completion_tokens"] == 5 and last["finish_reason"] == "length"


def test_echo_returns_the_prompt_first(tok):
    last = run(tok, "world", echo=True, max_new_tokens=1)[-1]
    assert last["text"] == "hello" + tok.decode(tok("world", add_special_tokens=False).input_ids[:1])


def test_logprobs_cover_each_generated_token(tok):
    last = run(tok, "one two three", logprobs=1, max_new_tokens=3)[-1]
    lp = last["logprobs"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["text_offset"]) == 3
    assert all(v <= 0 for v in lp["token_logprobs"]) and "".join(lp["tokens"]) == last["text"]
    echoed = run(tok, "one two", logprobs=1, echo=True, max_new_tokens=2)[-1]["logprobs"]
    assert echoed["token_logprobs"][0] is None and len(echoed["tokens"]) == len(tok("hello").input_ids) + 2
    assert echoed["top_logprobs"][0] == {} and all(len(top) == 1 for top in echoed["top_logprobs"][1:])


def test_top_logprobs_list_the_likeliest_tokens_of_each_step(tok):
    """``logprobs: N``: each generated token's N likeliest alternatives, likeliest first;
    greedy picks the first, so its logprob is that one's."""
    lp = run(tok, "one two three", logprobs=3, max_new_tokens=4, temperature=0)[-1]["logprobs"]
    assert len(lp["top_logprobs"]) == len(lp["tokens"]) == 4
    for chosen, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        values = list(top.values())
        assert 1 <= len(top) <= 3 and values == sorted(values, reverse=True)
        assert value == pytest.approx(values[0]) and top.get(chosen) == pytest.approx(value)
    assert all(top == {} for top in run(tok, "one two", logprobs=0, max_new_tokens=2)[-1]["logprobs"]["top_logprobs"])


def biased_logits(vocab, a, b):
    logits = torch.full((vocab,), -10.0)
    logits[a], logits[b] = 2.0, 1.9
    return logits


def test_repetition_penalty_is_applied(tok):
    a, b = 40, 41
    greedy = run(tok, logits=biased_logits(len(tok), a, b), max_new_tokens=4)[-1]["text"]
    penalized = run(tok, logits=biased_logits(len(tok), a, b), max_new_tokens=4, repetition_penalty=1.5)[-1]["text"]
    assert greedy == tok.decode([a] * 4)
    assert penalized != greedy and tok.decode([b]) in penalized


def test_top_k_one_and_tiny_top_p_are_greedy_even_at_high_temperature(tok):
    a, b = 40, 41
    torch.manual_seed(0)
    for params in ({"temperature": 1.5, "top_k": 1}, {"temperature": 1.5, "top_p": 1e-9}):
        text = run(tok, logits=biased_logits(len(tok), a, b), max_new_tokens=6, **params)[-1]["text"]
        assert text == tok.decode([a] * 6), params


def test_temperature_samples(tok):
    a, b = 40, 41
    torch.manual_seed(0)
    text = run(tok, logits=biased_logits(len(tok), a, b), max_new_tokens=40, temperature=1.0)[-1]["text"]
    assert tok.decode([b]) in text and tok.decode([a]) in text  # both likely tokens get drawn


def test_incremental_decoding_matches_a_full_decode(tok):
    text = "Naïve café — 😀 emoji, tabs\tand\nnew lines; numbers 12345."
    ids = tok(text, add_special_tokens=False).input_ids
    decoder = IncrementalDecoder(tok)
    assert "".join(decoder.add(i) for i in ids) == tok.decode(ids)


def test_no_per_token_redecoding_of_the_whole_output(tok, mocker):
    n = 300
    ids = (tok("the quick brown fox ", add_special_tokens=False).input_ids * 100)[:n]
    spy = mocker.spy(tok, "decode")
    run(tok, script=ids, max_new_tokens=n)
    decoded = sum(len(call.args[0]) for call in spy.call_args_list)
    assert decoded < 8 * n  # FastChat's loop decodes ~n^2/2 = 45,000 ids here


def test_stop_matcher_only_scans_the_tail():
    m = StopMatcher(["</s>", "###"])
    assert m.find("abc###", 3) == 3 and m.find("abc</", 2) == -1 and m.held_back("abc</") == 2
    assert StopMatcher(None).find("anything", 3) == -1 and StopMatcher("x").stops == ["x"]


def test_torch_uses_one_thread_per_physical_core_unless_told(monkeypatch):
    import psutil

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(1)
        assert use_physical_cores() == psutil.cpu_count(logical=False) == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        use_physical_cores()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_concurrent_streams_take_turns_on_the_engine_thread(tok):
    """Five clients at once: every model call runs on the engine's one thread, never two
    at a time, and every stream gets its full answer."""
    import threading
    import time

    class Tracking(ScriptedLM):
        active = peak = 0
        guard = threading.Lock()

        def __call__(self, *args, **kwargs):
            assert threading.current_thread().name == "model"
            with Tracking.guard:
                Tracking.active += 1
                Tracking.peak = max(Tracking.peak, Tracking.active)
            time.sleep(0.002)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                with Tracking.guard:
                    Tracking.active -= 1

    engine = Engine()
    stream = engine.streamer(token_loop)
    ids = tok("one two three four five six", add_special_tokens=False).input_ids
    results = []

    def one():
        params = {"prompt": "hello", "temperature": 0, "max_new_tokens": len(ids), "echo": False}
        *_, last = stream(Tracking(len(tok), ids, eos=tok.eos_token_id), tok, params, "cpu", 4096)
        results.append(last["text"])

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Tracking.peak == 1
    assert results == [tok.decode(ids)] * 5
