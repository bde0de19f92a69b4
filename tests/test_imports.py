"""Importing the package changes nothing: no adapter registered, no environment
rewritten, no torch or transformers unless the module imported needs them; the OpenAI
API server process never loads torch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import requests

from helpers import wait_for

ROOT = Path(__file__).resolve().parents[1]
# Modules whose process has no model: the package root, the API server, the launcher and
# diagnostics, and everything they share.
TORCH_FREE = (["fastchat_bigdl", "fastchat_bigdl.openai_api_server", "fastchat_bigdl.cli",
               "fastchat_bigdl.stack.serve"]
              + sorted(f"fastchat_bigdl.{p.parent.name}.{p.stem}".replace(".__init__", "")
                       for folder in ("api", "common") for p in (ROOT / "fastchat_bigdl" / folder).glob("*.py"))
              + sorted(f"fastchat_bigdl.api.tool_calling.{p.stem}".replace(".__init__", "")
                       for p in (ROOT / "fastchat_bigdl" / "api" / "tool_calling").glob("*.py")))
PROBE = r"""
import json, os, sys
before = dict(os.environ)
for name in sys.argv[1:]:
    __import__(name)
registry = sys.modules.get("fastchat.model.model_adapter")
sys.__stdout__.write(json.dumps({
    "heavy": sorted(m for m in ("torch", "transformers", "ipex_llm", "bigdl") if m in sys.modules),
    # TORCHINDUCTOR_CACHE_DIR: torch's inductor sets it itself (runtime/cache_dir_utils.py)
    # when transformers' model classes are imported, as in any process that imports them.
    "changed": sorted(k for k in set(before) | set(os.environ)
                      if before.get(k) != os.environ.get(k) and k != "TORCHINDUCTOR_CACHE_DIR"),
    "registered": bool(registry) and any(type(a).__name__ == "BigDLLLMAdapter" for a in registry.model_adapters),
}) + "\n")  # FastChat's server modules reroute sys.stdout through a logger
"""


def probe(*modules):
    env = {**os.environ, "http_proxy": "http://proxy.invalid:3128", "no_proxy": "corp.example.com"}
    env.pop("NO_PROXY", None)
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=180,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_servers_launcher_and_shared_modules_loads_no_torch_and_changes_nothing():
    assert "fastchat_bigdl.api.server" in TORCH_FREE and "fastchat_bigdl.common.netenv" in TORCH_FREE
    assert probe(*TORCH_FREE) == {"heavy": [], "changed": [], "registered": False}


def test_importing_the_worker_registers_nothing_and_keeps_the_environment():
    seen = probe("fastchat_bigdl.model_worker", "fastchat_bigdl.worker.bigdl_worker", "fastchat_bigdl.bench.main")
    assert seen["changed"] == [] and seen["registered"] is False
    assert "torch" in seen["heavy"]  # these modules need it


def test_register_is_explicit_and_idempotent():
    code = ("import fastchat_bigdl; a = fastchat_bigdl.register(); b = fastchat_bigdl.register(); "
            "from fastchat.model.model_adapter import get_model_adapter; "
            "print(a is b is get_model_adapter('/models/Llama-2-7b-chat-hf-bigdl'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr


def test_the_api_server_process_never_loads_torch(tmp_path):
    """The real process, serving: none of torch's libraries is mapped into it."""
    from fastchat_bigdl.stack.serve import free_port

    port = free_port()
    env = {**os.environ, "LOGDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "fastchat_bigdl.openai_api_server", "--host", "127.0.0.1",
                             "--port", str(port), "--controller-address", f"http://127.0.0.1:{free_port()}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        def answers():
            try:
                return requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code
            except requests.RequestException:
                return None
        wait_for(answers, 120, "the API server")  # it serves (no controller behind it: an error answer)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    assert "python" in maps  # the real process's mappings
    assert "libtorch" not in maps and "libc10" not in maps
