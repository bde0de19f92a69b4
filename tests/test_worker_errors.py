"""A failure during generation reaches the client as one clear line in FastChat's schema
(never FastChat's "NETWORK ERROR DUE TO HIGH TRAFFIC"), the worker log has the
traceback, and the worker keeps serving."""
import json
import logging

import pytest

from fastchat_bigdl.worker.bigdl_worker import BigDLModelWorker

PARAMS = {"prompt": "hello world", "max_new_tokens": 4, "temperature": 0, "echo": False}


@pytest.fixture(scope="module")
def worker(tiny_llama):
    return BigDLModelWorker("http://127.0.0.1:1", "http://127.0.0.1:2", "w", str(tiny_llama), None, 2,
                            no_register=True, low_bit_cache=None)


def last_chunk(worker, params=PARAMS):
    chunks = list(worker.generate_stream_gate(dict(params)))
    return json.loads(chunks[-1][:-1])


@pytest.mark.parametrize("fault", [KeyError("boom"), RuntimeError("boom\nsecond line"), ValueError("boom")],
                         ids=["KeyError", "RuntimeError", "ValueError"])
def test_injected_fault_is_one_clear_line_then_the_worker_serves_on(worker, mocker, caplog, fault):
    assert worker.runner is not None  # the default forward: the lean runner
    mocker.patch.object(worker.runner, "decode", side_effect=fault)  # prefill works, the next step fails
    with caplog.at_level(logging.ERROR, logger="fastchat_bigdl.model_worker"):
        failed = last_chunk(worker)
    assert failed["error_code"] == 50001
    assert f"{type(fault).__name__}: " in failed["text"] and "boom" in failed["text"]
    assert "second line" not in failed["text"]
    assert "NETWORK ERROR" not in failed["text"] and "Traceback" not in failed["text"]
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and logged[-1].exc_info[0] is type(fault)  # the traceback is in the worker log

    mocker.stopall()
    ok = last_chunk(worker)
    assert ok["error_code"] == 0 and ok["usage"]["completion_tokens"] >= 1


def test_non_streaming_generation_reports_the_same_way(worker, mocker):
    mocker.patch.object(worker.runner, "prefill_block_steps", side_effect=IndexError("index 7 is out of range"))
    result = worker.generate_gate(dict(PARAMS))
    assert result["error_code"] == 50001 and "IndexError: index 7 is out of range" in result["text"]
