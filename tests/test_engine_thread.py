"""One thread owns the model: loading and every generation step run there, whichever
request thread asks (a model run on another thread than the one that loaded it decodes
about a third slower on CPU)."""
import functools
import threading
import time

import pytest

from fastchat_bigdl.engine.scheduler import Engine


def test_a_generator_is_created_advanced_and_closed_on_the_model_thread():
    engine, seen = Engine(), []

    def counting():
        try:
            for i in range(5):
                seen.append(("step", threading.current_thread().name))
                yield i
        finally:
            seen.append(("closed", threading.current_thread().name))

    stepped = engine.streamer(counting, batched=False)()
    assert [next(stepped), next(stepped)] == [0, 1]
    stepped.close()  # the client went away after two chunks
    for _ in range(100):  # the engine closes it at its next turn
        if seen[-1][0] == "closed":
            break
        time.sleep(0.01)
    names = {name for _, name in seen}
    assert len(names) == 1 and names.pop().startswith("model") and seen[-1][0] == "closed"


def test_errors_raised_on_the_model_thread_reach_the_caller():
    def failing():
        yield 1
        raise KeyError("boom")

    stepped = Engine().streamer(failing, batched=False)()
    assert next(stepped) == 1
    with pytest.raises(KeyError, match="boom"):
        next(stepped)


@pytest.mark.parametrize("forward", ["lean", "hf"])
def test_the_worker_loads_and_generates_on_its_model_thread(tiny_llama, mocker, forward):
    import fastchat_bigdl
    from fastchat_bigdl.worker import bigdl_worker
    from fastchat_bigdl.worker.bigdl_worker import BigDLModelWorker

    threads = {}
    adapter = fastchat_bigdl.register()
    load = adapter.load_model

    def recording_load(*args, **kwargs):
        threads["load"] = threading.current_thread().name
        return load(*args, **kwargs)

    mocker.patch.object(adapter, "load_model", side_effect=recording_load)
    choose = bigdl_worker.choose_forward

    def recording_choose(*args, **kwargs):  # builds the runner: runs the kernels (its probes)
        threads["choose"] = threading.current_thread().name
        return choose(*args, **kwargs)

    mocker.patch.object(bigdl_worker, "choose_forward", side_effect=recording_choose)
    worker = BigDLModelWorker("http://127.0.0.1:1", "http://127.0.0.1:2", "w", str(tiny_llama), None, 2,
                              no_register=True, low_bit_cache=None, forward=forward)
    assert (worker.runner is not None) == (forward == "lean")

    def record(owner, name):
        original = getattr(owner, name)

        def recording(*args, **kwargs):
            threads.setdefault("forward", set()).add(threading.current_thread().name)
            return original(*args, **kwargs)

        mocker.patch.object(owner, name, side_effect=recording)

    if worker.runner is not None:
        record(worker.runner, "prefill_block_steps")  # what the engine runs a prompt block through
        record(worker.runner, "decode")
    else:
        record(worker.model, "forward")
    params = {"prompt": "hello world", "max_new_tokens": 4, "temperature": 0, "echo": False}
    chunks = []
    for _ in range(2):  # two requests, from two different request threads
        t = threading.Thread(target=lambda: chunks.extend(worker.generate_stream_gate(dict(params))))
        t.start()
        t.join()
    assert chunks and threads["load"].startswith("model") and threads["forward"] == {threads["load"]}
    assert threads["choose"] == threads["load"]


def test_a_failing_engine_turn_fails_its_streams_and_the_engine_serves_on(mocker):
    engine = Engine()

    def loop():
        yield "first chunk"
        yield "second chunk"

    mocker.patch.object(engine, "_advance", side_effect=RuntimeError("engine bug"))
    with pytest.raises(RuntimeError, match="engine bug"):
        list(engine.streamer(loop)())
    mocker.stopall()
    assert list(engine.streamer(loop)()) == ["first chunk", "second chunk"]
    assert engine.call(lambda: threading.current_thread().name) == "model"


@pytest.mark.backend
def test_a_long_prompt_is_prefilled_between_the_decode_steps_of_running_streams(tiny_tools):
    """While a ~2,900-token prompt is prefilled (46 blocks), a stream already decoding
    waits about one decode step's worth of prefill between its steps: here each prefill
    layer is made slower than a decode step (20 ms), so exactly one layer runs between
    two decode steps; the engine's calls, in the order it made them."""
    import time as _time

    import torch

    from fastchat_bigdl.engine.selection import choose_forward
    from fastchat_bigdl.engine.llama_runner import PREFILL_BLOCK
    from fastchat_bigdl.lowbit.backend import resolve_backend
    from fastchat_bigdl.lowbit.loader import load_low_bit_model
    from fastchat_bigdl.worker.generation import token_loop

    engine = Engine()
    model, tokenizer = engine.call(load_low_bit_model, str(tiny_tools), torch_dtype=torch.float32)
    runner, line = engine.call(choose_forward, model, resolve_backend(), "cpu")
    assert runner is not None, line
    engine.runner = runner
    calls = []

    class SlowInPrefill:
        def __init__(self, kernel):
            self.kernel = kernel

        def __call__(self, x):
            if x.shape[0] == PREFILL_BLOCK:
                calls.append("layer")
                _time.sleep(0.02)
            return self.kernel(x)

    for layer in runner.layers:
        layer.o = SlowInPrefill(layer.o)
    decode = runner.decode
    runner.decode = lambda steps: calls.append("decode") or decode(steps)
    stream = engine.streamer(functools.partial(token_loop, runner=runner))
    words = "the quick brown fox jumps over the lazy dog hello world one two three four five six seven".split()
    running = stream(model, tokenizer, {"prompt": "hello world", "temperature": 0, "max_new_tokens": 4000,
                                        "echo": False, "stop_token_ids": []}, "cpu", 8192, 1)
    next(running)  # decoding now
    calls.clear()
    *_, long_answer = stream(model, tokenizer, {"prompt": " ".join(words * 60), "temperature": 0,
                                                "max_new_tokens": 2, "echo": False}, "cpu", 4096, 1)
    running.close()
    layers = [i for i, kind in enumerate(calls) if kind == "layer"]
    assert len(layers) > 40 * len(runner.layers) and long_answer["usage"]["prompt_tokens"] > 2500
    between = "".join("L" if kind == "layer" else "d" for kind in calls[layers[0]:layers[-1] + 1])
    assert "LL" not in between, between[:200]  # never two prefill layers without a decode step