from fastchat_bigdl.common.netenv import bypass_proxy_for_loopback
from fastchat_bigdl.stack.serve import Stack


def test_loopback_is_merged_into_no_proxy_keeping_user_entries():
    env = {"no_proxy": "corp.example.com, .internal", "NO_PROXY": "10.0.0.1"}
    merged = bypass_proxy_for_loopback(env)
    entries = merged.split(",")
    assert entries[:3] == ["10.0.0.1", "corp.example.com", ".internal"]
    assert {"localhost", "127.0.0.1", "::1"} <= set(entries)
    assert env["NO_PROXY"] == env["no_proxy"] == merged
    assert bypass_proxy_for_loopback(env) == merged  # idempotent


def test_serve_children_bypass_proxies_and_wait_long_for_slow_decode(tmp_path, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("FASTCHAT_WORKER_API_TIMEOUT", raising=False)
    env = Stack(model_path="m", model_name="m", log_dir=tmp_path).env()
    assert "127.0.0.1" in env["no_proxy"].split(",") and "localhost" in env["NO_PROXY"].split(",")
    assert env["FASTCHAT_WORKER_API_TIMEOUT"] == "600"
    assert env["LOGDIR"] == str(tmp_path)
