"""A clean command line: every entry point's ``--help`` is plain argparse text, and
importing the package or asking for help writes no file anywhere."""
import os
import subprocess
import sys

import pytest

ENTRY_POINTS = {
    "worker": [sys.executable, "-m", "fastchat_bigdl.model_worker", "--help"],
    "api-server": [sys.executable, "-m", "fastchat_bigdl.openai_api_server", "--help"],
    "cli": [sys.executable, "-m", "fastchat_bigdl", "--help"],
    "serve": [sys.executable, "-m", "fastchat_bigdl", "serve", "--help"],
    "bench": [sys.executable, "-m", "fastchat_bigdl", "bench", "--help"],
    "doctor": [sys.executable, "-m", "fastchat_bigdl", "doctor", "--help"],
    "import": [sys.executable, "-c", "import fastchat_bigdl, fastchat_bigdl.model_worker, "
               "fastchat_bigdl.openai_api_server"],
}


def run_in_empty_dirs(tmp_path, argv):
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LOGDIR"}
    env.update(FASTCHAT_BIGDL_CACHE=str(cache), HOME=str(tmp_path / "home"))
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    # transformers' import keeps a version stamp in Hugging Face's own cache; not ours to prevent.
    hf_cache = tmp_path / "home" / ".cache" / "huggingface"
    written = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and hf_cache not in p.parents]
    return out, written


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_is_plain_and_writes_no_file(tmp_path, name):
    out, written = run_in_empty_dirs(tmp_path, ENTRY_POINTS[name])
    assert out.returncode == 0, out.stderr[-2000:]
    if name != "import":
        assert out.stdout.startswith("usage: "), out.stdout[:300]
    assert " | INFO | " not in out.stdout + out.stderr  # not routed through FastChat's logger
    assert "Warning" not in out.stderr, out.stderr[-1000:]
    assert written == []


def test_worker_usage_errors_are_one_plain_line(tmp_path):
    out, written = run_in_empty_dirs(tmp_path, [sys.executable, "-m", "fastchat_bigdl.model_worker",
                                                "--bigdl_load", "--model-path", "/nowhere", "--low-bit", "fp8"])
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m fastchat_bigdl.model_worker: error: --low-bit fp8 does not run on cpu")
    assert written == []
