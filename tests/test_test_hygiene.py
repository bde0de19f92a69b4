"""The suite cleans up after itself: a run's cache of converted models (1.6 GB with the
demo model) and its log directory are removed when the run ends, so repeated runs (CI,
nox sessions, developers) do not fill the disk."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_a_run_removes_the_cache_and_log_directories_it_made(tmp_path):
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "helpers.py").write_text((TESTS / "helpers.py").read_text())
    (tmp_path / "test_probe.py").write_text(
        "import os\n\ndef test_cache_is_set():\n"
        "    open(os.path.join(os.environ['FASTCHAT_BIGDL_CACHE'], 'model.bin'), 'wb').write(b'x' * 1000)\n"
        "    print('CACHE=' + os.environ['FASTCHAT_BIGDL_CACHE'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCHAT_BIGDL_CACHE", "LOGDIR")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    cache = next(line[len("CACHE="):] for line in out.stdout.splitlines() if line.startswith("CACHE="))
    assert Path(cache).name.startswith("fastchat-bigdl-test-cache-") and not Path(cache).exists()
    # and a run given a cache directory leaves it alone
    given = tmp_path / "given-cache"
    given.mkdir()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, env={**env, "FASTCHAT_BIGDL_CACHE": str(given)},
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and (given / "model.bin").exists()
