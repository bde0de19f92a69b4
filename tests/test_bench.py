"""`fastchat-bigdl bench`: the report's structure and sanity (speed is not asserted)."""
import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastchat_bigdl.bench import main as bench_main
from fastchat_bigdl.bench import measure as bench_measure
from fastchat_bigdl.bench import report as bench_report
from fastchat_bigdl.bench import settings as bench_settings
from fastchat_bigdl.bench.random_model import QUICK_SHAPE, build_random_llama, words

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_model_prompts_are_exact_token_counts(tmp_path):
    from transformers import AutoTokenizer

    shape = QUICK_SHAPE
    path = build_random_llama(tmp_path / "bench-m", shape)
    tok = AutoTokenizer.from_pretrained(str(path))
    assert len(tok) == shape.vocab
    text = words(37, seed=3, vocab=shape.vocab)
    assert len(tok(text, add_special_tokens=False).input_ids) == 37
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert build_random_llama(path, shape) == path  # reused, not rebuilt


def test_linear_param_count_matches_the_real_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = build_random_llama(tmp_path / "bench-m", QUICK_SHAPE)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == QUICK_SHAPE.linear_params
    assert sum(p.numel() for p in model.parameters()) >= QUICK_SHAPE.params


def test_big_shapes_are_written_a_layer_at_a_time_and_load(tmp_path):
    """The 7B shape's builder at tiny scale: bf16 shards, one per decoder layer (so no
    more than a layer is ever in memory), Hugging Face's names and init, exact sizes; the
    low-bit loader converts it and the lean runner serves it."""
    import json as _json

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from fastchat_bigdl.bench.random_model import SHAPE_1B, SHAPE_7B, LlamaShape, layer_tensors

    from fastchat_bigdl.bench.random_model import SHAPE_LLAMA32_1B, SHAPE_QWEN25_05B

    assert 6.7e9 < SHAPE_7B.params < 6.8e9 and 1.0e9 < SHAPE_1B.params < 1.2e9
    assert 1.23e9 < SHAPE_LLAMA32_1B.params < 1.24e9 and 0.49e9 < SHAPE_QWEN25_05B.params < 0.50e9  # as published
    shape = LlamaShape(hidden=256, layers=3, heads=8, kv_heads=2, intermediate=512, vocab=512, context=256,
                       rope_theta=5e5)
    lines = []
    path = build_random_llama(tmp_path / "tiny-7b-like", shape, dtype="bfloat16", progress=lines.append)
    index = _json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) == shape.layers + 2 and len(lines) == len(shards)
    for layer in range(shape.layers):
        with safe_open(str(path / shards[layer + 1]), "pt") as f:
            assert set(f.keys()) == set(layer_tensors(shape, layer))  # exactly one layer per shard
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == shape.params + (2 * shape.layers + 1) * shape.hidden  # + norms
    q = model.model.layers[1].self_attn.q_proj.weight.float()
    assert q.dtype == torch.float32 and abs(q.std().item() - 0.02) < 0.002
    assert torch.equal(model.model.norm.weight, torch.ones(shape.hidden, dtype=torch.bfloat16))
    assert model.config.rope_theta == 5e5
    assert build_random_llama(path, shape, dtype="bfloat16") == path  # reused
    assert build_random_llama(path, shape, dtype="float32") == path and \
        _json.loads((path / "config.json").read_text())["torch_dtype"] == "float32"  # rebuilt in fp32

    from fastchat_bigdl.engine.selection import choose_forward
    from fastchat_bigdl.lowbit.backend import resolve_backend
    from fastchat_bigdl.lowbit.loader import load_low_bit_model

    low_bit, tokenizer = load_low_bit_model(str(path), torch_dtype=torch.float32)
    runner, line = choose_forward(low_bit, resolve_backend(), "cpu")
    assert runner is not None, line
    ids = tokenizer(words(20, seed=1, vocab=shape.vocab)).input_ids
    logits = runner.prefill(ids, runner.new_sequence())
    assert logits.shape == (1, shape.vocab) and torch.isfinite(logits).all()


def fake_report(ours_tok_s=30.0, stock_tok_s=10.0):
    def stack(low_bit, tok_s, ttfts, starts, loads, rss):
        return {"low_bit": low_bit, "start_s": starts, "model_load_s": loads,
                "decode": {"tok_s": tok_s, "ttft_s": ttfts[0], "runs": []},
                "replay": [{"turn": i + 1, "ttft_s": t} for i, t in enumerate(ttfts)],
                "replay_ttft_last_over_first": ttfts[-1] / ttfts[0], "peak_rss_mb": rss,
                "roofline": {"tok_s": 100.0, "percent": tok_s, "bytes_per_token": 1.0}}

    report = {"machine": {"bandwidth_gbs": 20.0, "cpus": 2}, "model": {"params": 3e8, "name": "m"},
              "stacks": {bench_settings.OURS: stack("sym_int4", ours_tok_s, [0.1, 0.12], [20.0, 8.0], [10.0, 1.0], 500),
                         bench_settings.STOCK: stack("fp32", stock_tok_s, [0.2, 0.8], [9.0], [], 1500)}}
    report["baseline"] = bench_report.baseline(report["stacks"])
    report["ratios"] = bench_report.compare(report["stacks"][bench_settings.OURS], report["stacks"][bench_settings.STOCK])
    report["targets"] = bench_report.targets(report)
    return report


def test_ratios_and_targets_are_computed_from_the_measurements():
    report = fake_report()
    r = report["ratios"]
    assert r["decode_speedup"] == pytest.approx(3.0)
    assert r["replay_last_turn_ttft_speedup"] == pytest.approx(0.8 / 0.12)
    assert r["cached_model_load_speedup"] == pytest.approx(10.0)
    assert r["cached_start_speedup"] == pytest.approx(2.5)
    assert r["peak_rss_ratio"] == pytest.approx(1 / 3)
    t = report["targets"]
    assert t["decode >= 3x stock fp32"]["met"] and t["cached start >= 5x faster (model load)"]["met"]
    assert t["replay turn-last TTFT <= 1.5x turn-1"]["met"] and not t["roofline >= 50%"]["met"]
    assert not bench_report.targets(fake_report(ours_tok_s=20.0))["decode >= 3x stock fp32"]["met"]
    table = bench_report.format_table(report)
    assert "3.00x" in table and "NOT met" in table


def test_at_7b_stock_fp32_that_did_not_fit_is_reported_and_bf16_is_the_baseline(tmp_path):
    report = fake_report(ours_tok_s=3.0, stock_tok_s=1.0)
    stacks = report["stacks"]
    stacks[bench_settings.STOCK_BF16] = dict(stacks[bench_settings.STOCK], low_bit="bf16")
    stacks[bench_settings.STOCK] = dict(bench_report.NOT_MEASURED, low_bit="fp32", failed="did not fit: ...")
    stacks[bench_settings.OURS].update(peak_rss_mb=4800, start_peak_rss_mb=[16900, 4900],
                                       start_peak_anon_mb=[16000, 4000],
                                       long_prompt={"prompt_tokens": 1000, "ttft_s": 40.0},
                                       agent_chat={"turns": [{"seconds": 20.0}, {"seconds": 25.5}], "error": None})
    report["model"]["params"] = 6.7e9
    report["baseline"] = bench_report.baseline(stacks)
    assert report["baseline"] == bench_settings.STOCK_BF16
    report["ratios"] = bench_report.compare(stacks[bench_settings.OURS], stacks[report["baseline"]])
    t = bench_report.targets(report)
    assert t["decode >= 2x stock bf16"]["met"] and "decode >= 3x stock fp32" not in t
    assert t["worker peak RSS serving <= 6 GB"]["met"]  # 4800 MiB = 5.0 GB
    assert not t["converting worker peak memory (anonymous) <= 16 GB"]["met"]  # 16000 MiB = 16.8 GB
    report["targets"] = t
    table = bench_report.format_table(report)
    assert "stock-fastchat-bf16 (bf16)" in table.splitlines()[0]
    assert "stock-fastchat (fp32): did not fit" in table
    assert "AutoGen two-agent chat: 2 turns (20.0, 25.5 s); completed" in table
    assert "TTFT, 1000-token prompt (s)" in table and "16900 / 4900 (convert / cached)" in table
    bench_report.plot(report, tmp_path / "bench.png")  # the failed stack has no series
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC
    # --stock-dtypes none: this package alone
    alone = {**report, "stacks": {bench_settings.OURS: stacks[bench_settings.OURS]}, "baseline": None}
    alone["ratios"] = bench_report.compare(stacks[bench_settings.OURS], None)
    alone["targets"] = bench_report.targets(alone)
    assert alone["targets"]["decode >= 2x stock bf16"]["value"] is None
    assert "fastchat-bigdl (sym_int4)" in bench_report.format_table(alone)


def test_memory_watchdog_stops_only_the_process_that_grows():
    grower = subprocess.Popen([sys.executable, "-c", "import time\nx = []\nwhile True:\n"
                               "    x.append(bytearray(20 << 20)); time.sleep(0.02)"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        watchdog = bench_measure.MemoryWatchdog(grower.pid, limit_mb=300, poll_s=0.05)
        assert grower.wait(30) == -9  # SIGKILL, from the watchdog
        watchdog.stop()
        assert 300 < watchdog.killed_at_mb < 600 and watchdog.killed_after_s < 30
        assert "stopped the worker at 0." in watchdog.describe() and "limit 0.3 GiB" in watchdog.describe()
        assert watchdog.peak_anon_mb == watchdog.killed_at_mb
        assert bystander.poll() is None
    finally:
        for p in (grower, bystander):
            p.kill()
            p.wait()


@pytest.mark.slow
def test_a_stock_worker_that_does_not_fit_is_a_result_not_a_crash(tmp_path):
    """The 7B case at small scale: stock FastChat's worker passes the memory limit while
    loading; the bench records why and stops that stack, and nothing is left running."""
    import psutil

    model = build_random_llama(tmp_path / "bench-m", QUICK_SHAPE)
    s = settings(tmp_path, memory_limit_mb=200, against=())  # torch alone is more than that
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    lines = []
    result = bench_measure.measure_stack(s, str(model), "bench-m", None, starts=1, count=lambda t: len(t.split()),
                                         progress=lines.append)
    assert result.failure.startswith("did not fit: the bench's memory watchdog stopped the worker at")
    assert result.decode == [] and result.replay == [] and result.starts_s == []
    assert any("did not fit" in line for line in lines)
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before  # controller, API stopped too


def test_roofline_uses_the_bytes_each_format_reads():
    shape = QUICK_SHAPE
    result = bench_measure.StackResult("x", "sym_int4", decode=[{"tok_s": 10.0, "ttft_s": 0.1}],
                               replay=[{"turn": 1, "ttft_s": 0.1}])
    summary = bench_report.summarize(result, shape, bandwidth_gbs=10.0)
    assert summary["roofline"]["bytes_per_token"] == pytest.approx(shape.linear_params * 18 / 32)
    fp32 = bench_report.summarize(bench_measure.StackResult("y", None, decode=result.decode, replay=result.replay), shape, 10.0)
    assert fp32["roofline"]["tok_s"] == pytest.approx(summary["roofline"]["tok_s"] * (18 / 32) / 4)


@pytest.mark.slow
def test_quick_bench_writes_table_json_and_plot(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastchat_bigdl", "bench", "--quick", "--profile",
                          "--stock-dtypes", "float32,bfloat16", "--long-prompt", "40", "--agent-chat", "3",
                          "--long-chat", "200", "--memory-cgroup", "4",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "decode run 1/1" in out.stdout and "replay turn 3/3" in out.stdout  # progress shown
    assert "decode tok/s" in out.stdout and "% of roofline" in out.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert report["machine"]["bandwidth_gbs"] > 0
    for label in (bench_settings.OURS, bench_settings.STOCK):
        stack = report["stacks"][label]
        assert stack["decode"]["tok_s"] > 0 and 0 < stack["decode"]["ttft_s"] < 60
        assert [t["turn"] for t in stack["replay"]] == [1, 2, 3]
        history = [t["history_tokens"] for t in stack["replay"]]
        assert history == sorted(history) and history[0] < history[-1]  # it grows each turn
        assert all(t["ttft_s"] <= t["latency_s"] for t in stack["replay"])
        assert stack["peak_rss_mb"] > 50 and stack["roofline"]["tok_s"] > 0
    ours = report["stacks"][bench_settings.OURS]
    assert ours["low_bit"] == "sym_int4" and len(ours["start_s"]) == 2 and len(ours["model_load_s"]) == 2
    assert report["ratios"]["decode_speedup"] == pytest.approx(
        ours["decode"]["tok_s"] / report["stacks"][bench_settings.STOCK]["decode"]["tok_s"])
    long = ours["long_chat"]
    assert set(report["targets"]) == {"decode >= 3x stock fp32", "replay turn-last TTFT <= 1.5x turn-1",
                                      "cached start >= 5x faster (model load)", "roofline >= 50%",
                                      "API decode >= 0.85x kernel ceiling", "API decode >= 0.9x in-process",
                                      f"worker peak RSS over a {long['history_tokens']}-token chat <= 6 GB",
                                      "start 1 in a 4 GiB memory cgroup: OOM kills",
                                      "start 2 in a 4 GiB memory cgroup: OOM kills"}
    # --long-chat: four turns of 50 new tokens at least, the history sent whole each time
    assert len(long["turns"]) >= 4 and long["history_tokens"] >= 200 and long["peak_since_reset"]
    assert [t["history_tokens"] for t in long["turns"]] == sorted(t["history_tokens"] for t in long["turns"])
    assert all(t["sent_tokens"] == t["history_tokens"] for t in long["turns"])  # it fits: nothing trimmed
    assert 50 < long["peak_rss_mb"] <= ours["peak_rss_mb"] * 1.5 and 0 < long["peak_anon_mb"] <= long["peak_rss_mb"]
    # --memory-cgroup: both of our worker's starts ran inside a 4 GiB group and were not killed
    groups = ours["memory_cgroup"]
    assert [g["limit_mb"] for g in groups] == [4096, 4096] and all(g["oom_kills"] == 0 for g in groups)
    assert all(g["peak_mb"] > 50 for g in groups)  # the worker's memory was charged to it
    assert "long agent chat: " in out.stdout and "GiB memory cgroup" in out.stdout
    # --profile: one token's time split in-process, related to the API's speed of the same run
    ms = report["profile"]["ms_per_token"]
    assert all(ms[k] > 0 for k in ("linear", "attention", "lean_forward", "token_loop", "hf_forward"))
    # parts of the forward, not more; each part is timed on its own, so under a loaded machine
    # (CI with other work running) their sum drifts: only a gross double count fails this
    assert ms["linear"] + ms["attention"] < 3 * ms["lean_forward"]
    assert report["profile"]["tok_s"]["kernel_ceiling"] == pytest.approx(1000 / ms["linear"])
    assert report["ratios"]["api_decode_over_kernel_ceiling"] == pytest.approx(
        ours["decode"]["tok_s"] / report["profile"]["tok_s"]["kernel_ceiling"])
    assert "one token in-process: low-bit linears" in out.stdout and "serving adds" in out.stdout
    assert "avx2" in report["machine"]["cpu"] or "no AVX2" in report["machine"]["cpu"]
    # the concurrency sweep (--quick: 1 and 2 streams at once), ours only
    sweep = ours["concurrency"]
    assert [r["streams"] for r in sweep] == [1, 2] and all(not r["errors"] for r in sweep)
    assert all(r["aggregate_tok_s"] > 0 and r["gap_p99_ms"] >= r["gap_p50_ms"] > 0 for r in sweep)
    assert sweep[1]["tokens"] > sweep[0]["tokens"]  # two streams' worth of answers
    assert report["stacks"][bench_settings.STOCK]["concurrency"] == []
    assert " 2 streams at once:" in out.stdout
    # --stock-dtypes: stock in bf16 too; --long-prompt; --agent-chat: a real AutoGen chat against ours
    bf16 = report["stacks"][bench_settings.STOCK_BF16]
    assert bf16["low_bit"] == "bf16" and bf16["decode"]["tok_s"] > 0 and not bf16["failed"]
    assert report["baseline"] == bench_settings.STOCK  # fp32 fit: it stays the baseline
    for label in (bench_settings.OURS, bench_settings.STOCK, bench_settings.STOCK_BF16):
        long = report["stacks"][label]["long_prompt"]
        assert long["prompt_tokens"] == 40 and long["ttft_s"] > 0
    assert len(ours["start_peak_rss_mb"]) == 2 and all(v > 50 for v in ours["start_peak_rss_mb"])
    assert all(50 < anon <= rss for anon, rss in zip(ours["start_peak_anon_mb"], ours["start_peak_rss_mb"]))
    chat = ours["agent_chat"]
    assert chat["error"] is None and [t["agent"] for t in chat["turns"]] == ["critic", "writer", "critic"]
    assert all(t["seconds"] > 0 for t in chat["turns"])
    assert "AutoGen two-agent chat: 3 turns" in out.stdout


# --- bench --against llama-cpp: the plumbing, with llama.cpp replaced -----------------------

FAKE_LLAMA_CPP = '''
"""Stands in for llama-cpp-python: same calls, scripted answers, a 1-token-per-word tokenizer."""
__version__ = "0.0-fake"


class LlamaRAMCache:
    def __init__(self, capacity_bytes):
        self.capacity_bytes = capacity_bytes


class Llama:
    def __init__(self, model_path, n_ctx, n_threads, n_threads_batch, verbose):
        assert open(model_path, "rb").read(4) == b"GGUF"
        self.cache = None

    def set_cache(self, cache):
        self.cache = cache

    def tokenize(self, data, add_bos, special):
        return data.split()

    def create_chat_completion(self, messages, max_tokens, temperature, stream):
        assert stream and temperature == 0 and self.cache is not None
        yield {"choices": [{"delta": {"role": "assistant"}}]}
        for i in range(max_tokens):
            yield {"choices": [{"delta": {"content": f" w{len(messages)}x{i}"}}]}

    def create_completion(self, prompt, max_tokens, temperature, stream):
        assert stream and temperature == 0 and all(isinstance(t, int) for t in prompt)
        import os, signal
        if os.environ.get("FAKE_LLAMA_CPP_CRASH"):  # as a native build on an AMX VM did
            os.kill(os.getpid(), signal.SIGSEGV)
        for i in range(max_tokens):  # answers with the prompt's last ids, so the test sees what came in
            yield {"choices": [{"text": f" w{prompt[-1 - i % len(prompt)]}"}]}
'''


@pytest.fixture
def fake_llama_cpp(tmp_path, monkeypatch):
    """llama-cpp-python replaced; the GGUF is a real one (the bench model exported)."""
    from fastchat_bigdl.bench.gguf_export import export_gguf

    (tmp_path / "fakes").mkdir()
    (tmp_path / "fakes" / "llama_cpp.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "fakes"))
    model = build_random_llama(tmp_path / "bench-m", QUICK_SHAPE)
    return export_gguf(model, tmp_path / "model.gguf")


def settings(tmp_path, **overrides):
    values = dict(shape=QUICK_SHAPE, model_path=None, low_bit="sym_int4", prompt_tokens=12, max_tokens=6, repeats=2,
                  turns=3, turn_tokens=5, turn_max_tokens=4, out_dir=tmp_path / "out", against=("llama-cpp",))
    values.update(overrides)
    return bench_settings.BenchSettings(**values)


def test_llama_cpp_is_measured_in_a_process_of_its_own(tmp_path, fake_llama_cpp):
    from fastchat_bigdl.bench import llama_cpp_peer as bench_llama_cpp

    lines = []
    result = bench_llama_cpp.measure(settings(tmp_path), str(fake_llama_cpp), lines.append,
                                     chat_factory=bench_llama_cpp.LlamaCppProcess)
    assert result.label == bench_settings.LLAMA_CPP and result.low_bit == "q4_0"  # read from the GGUF
    assert [r["tokens"] for r in result.decode] == [6, 6]  # counted by llama.cpp's tokenizer
    assert [t["turn"] for t in result.replay] == [1, 2, 3]
    history = [t["history_tokens"] for t in result.replay]
    assert history[0] == 12 + len(bench_settings.SYSTEM.split()) and history == sorted(history)
    assert 0 < result.peak_rss_mb < 300  # the child's own: no torch, no FastChat
    assert any("replay turn 3/3" in line for line in lines)


def test_llama_cpp_gets_the_token_ids_the_fastchat_worker_prefills(tmp_path, fake_llama_cpp):
    """A bench model's words are not llama.cpp's to tokenize: the bench renders the chat with
    the stacks' FastChat template and tokenizes it with the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    from fastchat_bigdl.bench import llama_cpp_peer as bench_llama_cpp

    model = tmp_path / "bench-m"
    encode = bench_llama_cpp.chat_prompt_ids(str(model), bench_settings.CONV_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "w7 w8 w9"},
                {"role": "assistant", "content": "w10"}, {"role": "user", "content": "w11 w12"}]
    ids = encode(messages)
    tok = AutoTokenizer.from_pretrained(str(model))
    text = tok.decode(ids)
    assert "w7 w8 w9" in text and "w10" in text and text.rstrip().endswith("w11 w12 <unk>")  # "ASSISTANT:"
    s = settings(tmp_path, max_tokens=3, repeats=1, turns=2)
    result = bench_llama_cpp.measure(s, str(fake_llama_cpp), lambda line: None, encode=encode,
                                     count=lambda text: len(text.split()))
    assert [r["tokens"] for r in result.decode] == [3]
    assert [t["history_tokens"] for t in result.replay][0] == 12 + len(bench_settings.SYSTEM.split())


def test_a_llama_cpp_crash_is_a_result_with_the_fix_not_a_lost_bench(tmp_path, fake_llama_cpp, monkeypatch):
    from fastchat_bigdl.bench import llama_cpp_peer as bench_llama_cpp

    monkeypatch.setenv("FAKE_LLAMA_CPP_CRASH", "1")
    model = tmp_path / "bench-m"
    encode = bench_llama_cpp.chat_prompt_ids(str(model), bench_settings.CONV_TEMPLATE)
    lines = []
    result = bench_llama_cpp.measure(settings(tmp_path), str(fake_llama_cpp), lines.append, encode=encode,
                                     count=lambda text: len(text.split()))
    assert "exited with code -11" in result.failure and "GGML_AMX_INT8=OFF" in result.failure
    assert result.decode == [] and any("llama.cpp stopped" in line for line in lines)
    summary = bench_report.summarize(result, QUICK_SHAPE, 10.0)
    assert summary["failed"] and summary["decode"]["tok_s"] is None
    report = fake_report()
    report["stacks"][bench_settings.LLAMA_CPP] = summary
    report["vs_llama_cpp"] = bench_report.compare_with_peer(report["stacks"][bench_settings.OURS], summary)
    report["targets"] = bench_report.targets(report)
    assert report["targets"]["decode >= 0.6x llama.cpp"]["met"] is False
    assert "llama.cpp (q4_0): llama.cpp stopped" in bench_report.format_table(report)


def test_missing_llama_cpp_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from fastchat_bigdl.bench import llama_cpp_peer as bench_llama_cpp

    monkeypatch.setattr(bench_llama_cpp, "llama_cpp_version", lambda: None)
    assert bench_main.main(["--against", "llama-cpp", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs llama-cpp-python" in err and "GGML_AMX_TILE=OFF" in err


def test_against_llama_cpp_compares_the_demo_gguf_with_its_converted_checkpoint(tmp_path):
    from fastchat_bigdl.stack.demo_model import DEMO_GGUF, DEMO_NAME

    args = argparse.Namespace(model_path=None, gguf=None, against=["llama-cpp"], quick=True, low_bit="sym_int4",
                              turns=None, out=str(tmp_path), profile=False, concurrency=None)
    s = bench_main.settings_from_args(args)
    assert s.gguf_path.endswith(DEMO_GGUF) and Path(s.model_path).name == DEMO_NAME
    assert s.conv_template is None and s.prompt_style == "english"  # both use the model's ChatML template
    assert s.shape.hidden == 576 and s.shape.layers == 30  # SmolLM2-135M, read from the converted config
    assert s.shape.tied_embeddings and 130e6 < s.shape.params < 140e6  # its lm_head is the embedding
    assert s.concurrency == (1, 2)
    assert bench_main.concurrency_levels("1,4,8", quick=False) == (1, 4, 8)
    assert bench_main.concurrency_levels("0", quick=False) == ()
    with pytest.raises(SystemExit, match="numbers like 1,2,4,8"):
        bench_main.concurrency_levels("two", quick=False)
    assert bench_main.stock_dtypes("float32, bfloat16") == ("float32", "bfloat16")
    assert bench_main.stock_dtypes("none") == ()
    with pytest.raises(SystemExit, match="float32, bfloat16, float16 or none"):
        bench_main.stock_dtypes("fp8")
    with pytest.raises(SystemExit, match="needs --gguf"):
        bench_main.settings_from_args(argparse.Namespace(**{**vars(args), "model_path": "/some/model"}))


def test_the_llama_cpp_column_ratios_and_plot_series(tmp_path):
    report = fake_report(ours_tok_s=30.0)
    peer = json.loads(json.dumps(report["stacks"][bench_settings.STOCK]))
    peer.update(low_bit="q4_1", peak_rss_mb=250, decode={"tok_s": 60.0, "ttft_s": 0.05, "runs": []},
                replay=[{"turn": 1, "ttft_s": 0.05}, {"turn": 2, "ttft_s": 0.06}])
    report["stacks"][bench_settings.LLAMA_CPP] = peer
    report["vs_llama_cpp"] = bench_report.compare_with_peer(report["stacks"][bench_settings.OURS], peer)
    vs = report["vs_llama_cpp"]
    assert vs["decode_speedup"] == pytest.approx(0.5) and vs["ttft_speedup"] == pytest.approx(0.5)
    assert vs["replay_last_turn_ttft_speedup"] == pytest.approx(0.06 / 0.12)
    assert vs["peak_rss_ratio"] == pytest.approx(2.0)  # ours / theirs
    table = bench_report.format_table(report)
    header = table.splitlines()[0]
    assert "llama.cpp (q4_1)" in header and "ours vs llama.cpp" in header
    assert "0.50x" in table.splitlines()[2]  # decode row
    bench_report.plot(report, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


def test_english_prompts_are_counted_by_the_model_tokenizer(tiny_llama, tmp_path):
    s = settings(tmp_path, prompt_style="english")
    text = bench_settings.prompt(s, 20, seed=1)
    assert len(text.split()) == 20 and text == bench_settings.prompt(s, 20, seed=1)
    count = bench_settings.token_counter(s, str(tiny_llama))
    assert count(text) >= 20


def test_llama_cpp_may_run_in_a_python_of_its_own(tmp_path, fake_llama_cpp, monkeypatch):
    """llama-cpp-python in its own virtualenv (it brings numpy 2): the bench asks that
    Python for its version and runs llama.cpp there; a Python that cannot import it is the
    same clear 'missing' as an uninstalled one."""
    from fastchat_bigdl.bench import llama_cpp_peer

    python = tmp_path / "llama-python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setenv(llama_cpp_peer.LLAMA_CPP_PYTHON_ENV, str(python))
    assert llama_cpp_peer.llama_cpp_version() == "0.0-fake"
    process = llama_cpp_peer.LlamaCppProcess(str(fake_llama_cpp), threads=1)
    try:
        assert process.proc.args[0] == str(python)
    finally:
        process.close()
    monkeypatch.setenv(llama_cpp_peer.LLAMA_CPP_PYTHON_ENV, str(tmp_path / "no-such-python"))
    assert llama_cpp_peer.llama_cpp_version() is None


def test_kv_cache_comparison_reports_each_type_against_fp32_and_its_noise_floor(tmp_path):
    """``bench --kv-cache`` in-process on the quick model: bytes a position per type,
    decode times, and for each type below fp32 (and the nudged fp32 that gives the noise
    floor) greedy agreement and logit error; the report prints one line per type."""
    from fastchat_bigdl.bench.kv_cache_compare import NUDGED, compare_kv_caches

    path = build_random_llama(tmp_path / "bench-m", QUICK_SHAPE)
    result = compare_kv_caches(str(path), "sym_int4", tokens=6, contexts=(64,))
    types = result["types"]
    assert list(types) == ["fp32", "bf16", "int8", NUDGED]
    s = QUICK_SHAPE
    head_dim = s.hidden // s.heads
    assert types["fp32"]["bytes_per_position"] == s.layers * 2 * s.kv_heads * head_dim * 4
    assert types["bf16"]["bytes_per_position"] * 2 == types["fp32"]["bytes_per_position"]
    assert types["int8"]["bytes_per_position"] == s.layers * 2 * s.kv_heads * (head_dim + 2)
    assert all(t["decode_ms"]["64"] > 0 for name, t in types.items() if name != NUDGED)
    for name in ("bf16", "int8", NUDGED):
        t = types[name]
        assert len(t["tokens_before_first_difference"]) == result["prompts"] == 8
        assert all(0 <= n <= 6 for n in t["tokens_before_first_difference"])
        assert 0 < t["logit_error_mean"] <= t["logit_error_max"] < 1  # moved, not broken
    lines = bench_report._kv_cache_lines(result)
    assert len(lines) == 4 and "KV cache bf16:" in lines[1] and "greedy answers identical to fp32's" in lines[1]
    assert lines[3].startswith(f"KV cache {NUDGED}: ") and "KiB" not in lines[3]


def test_a_memory_cgroup_bounds_what_a_process_started_in_it_can_hold(tmp_path):
    """The kernel enforces ``bench --memory-cgroup``'s limit on the process it starts."""
    from fastchat_bigdl.bench.memory_cgroup import CgroupUnavailable, MemoryCgroup

    try:
        group = MemoryCgroup(f"fastchat-bigdl-test-{os.getpid()}", 200)
    except CgroupUnavailable as exc:
        pytest.skip(str(exc))
    try:
        def hold(mb):
            code = f"import time; b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.2)"
            return subprocess.run(group.command_prefix() + [sys.executable, "-c", code], timeout=60).returncode

        assert hold(100) == 0 and group.peak_mb() >= 100 and group.oom_kills() == 0
        assert hold(400) == -signal.SIGKILL and group.oom_kills() == 1  # killed inside the group, nothing else
    finally:
        group.remove()


@pytest.fixture
def chat_server():
    """A stand-in chat endpoint answering each POST with the next scripted (status, body):
    a dict is a JSON answer, a list of dicts an SSE stream of those chunks."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    script, bodies = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, answer = script.pop(0)
            if isinstance(answer, list):
                data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in answer) + b"data: [DONE]\n\n"
                kind = "text/event-stream"
            else:
                data, kind = json.dumps(answer).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", script, bodies
    server.shutdown()


def delta(text):
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_the_long_chat_trims_its_history_as_autogen_local_does(chat_server):
    url, script, bodies = chat_server
    overflow = {"object": "error", "code": 40303, "message": "This model's maximum context length is 100 tokens. "
                "However, your messages resulted in 180 tokens. Please reduce the length of the messages."}
    script += [(400, overflow), (200, [delta("ok"), delta("!")])]
    messages = [{"role": "system", "content": "s"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 80} for i in range(5)]
    ttft, sent, text = bench_measure.trimming_chat(url, "m", messages, 8)
    assert text == "ok!" and ttft >= 0
    assert sent[0]["role"] == "system" and sent[-1] == messages[-1] and len(sent) < len(messages)
    assert bodies[1]["messages"] == sent and bodies[0]["messages"] == messages


def test_an_error_inside_the_stream_is_reported_not_a_crash(chat_server):
    url, script, _ = chat_server
    script.append((200, [delta("part"), {"object": "error", "message": "the worker timed out", "code": 50006}]))
    with pytest.raises(RuntimeError, match="error in the stream: .*the worker timed out"):
        bench_measure.trimming_chat(url, "m", [{"role": "user", "content": "hi"}], 8)
