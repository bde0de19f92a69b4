"""A real served model for the AutoGen flavor sessions.

These virtualenvs hold AutoGen and autogen_local only (no torch): the stack runs under
the main environment's Python, given by $FASTCHAT_BIGDL_SERVER_PYTHON.
"""
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
MODEL = "tinyllm-instruct"
TOOLS_MODEL = "tinyllm-tools"  # context long enough for a tool prompt
BUILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
    "from helpers import CHATML_TEMPLATE, build_tiny_llama; "
    "build_tiny_llama(Path(sys.argv[2]), chat_template=CHATML_TEMPLATE, context=int(sys.argv[3]))"
)


class Server:
    def __init__(self, base_url, proc, model):
        self.base_url, self.proc, self.model = base_url, proc, model


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(root, name, context):
    python = os.environ.get("FASTCHAT_BIGDL_SERVER_PYTHON") or pytest.fail(
        "set FASTCHAT_BIGDL_SERVER_PYTHON to the Python of an environment with fastchat-bigdl[cpu]")
    model = root / name
    subprocess.run([python, "-c", BUILD, str(TESTS), str(model), str(context)], check=True, timeout=300)
    port = free_port()
    proc = subprocess.Popen([python, "-m", "fastchat_bigdl", "serve", "--model-path", str(model),
                             "--port", str(port), "--log-dir", str(root / "logs")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("fastchat-bigdl ready: "):
            break
    else:
        pytest.fail("serve did not start:\n" + "".join(lines))
    return Server(f"http://127.0.0.1:{port}/v1", proc, name)


def stop(server):
    server.proc.send_signal(signal.SIGINT)
    server.proc.wait(60)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = serve(tmp_path_factory.mktemp("flavor-server"), MODEL, 256)
    yield s
    stop(s)


@pytest.fixture(scope="session")
def tool_server(tmp_path_factory):
    s = serve(tmp_path_factory.mktemp("flavor-tool-server"), TOOLS_MODEL, 4096)
    yield s
    stop(s)
