"""Without --bigdl_load the worker is upstream FastChat's, loading in full precision."""

import pytest
import requests
import torch

from fastchat_bigdl.stack.serve import Stack, free_port
from helpers import pids_alive

pytestmark = pytest.mark.slow

PROMPT = "hello world how are"


def worker_without_bigdl_load(child):
    if child.name == "worker":
        child.argv[child.argv.index("fastchat.serve.model_worker")] = "fastchat_bigdl.model_worker"
    return child


def test_without_bigdl_load_the_upstream_worker_serves_fp32(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the same three processes, with fastchat_bigdl.model_worker started without --bigdl_load
    stack = Stack(model_path=str(tiny_llama), model_name="Llama-2-7b-chat-hf", log_dir=tmp_path,
                  port=free_port(), low_bit=None)
    stack.plan = lambda plan=stack.plan: [worker_without_bigdl_load(c) for c in plan()]
    stack.start()
    try:
        stack.wait_ready(240, progress=lambda line: None)
        body = {"model": stack.model_name, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        served = requests.post(stack.base_url + "/completions", json=body, timeout=120).json()
    finally:
        stack.stop()
    assert pids_alive([c.proc.pid for c in stack.children]) == []
    worker_log = (tmp_path / "worker.out").read_text()
    assert "fastchat_bigdl.lowbit" not in worker_log  # never went through the low-bit loader

    # FastChat's fp32 greedy decode == transformers' fp32 greedy decode
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), torch_dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert served["choices"][0]["finish_reason"] == "length"
    assert served["choices"][0]["text"] == expected
