import os
import re
import subprocess
import sys

import pytest

from fastchat_bigdl.worker import arguments as worker_arguments
from fastchat_bigdl.worker import main as worker_main

WORKER = [sys.executable, "-m", "fastchat_bigdl.model_worker"]


def option_strings(parser):
    return {opt for action in parser._actions for opt in action.option_strings}


def run(args, timeout=120):
    return subprocess.run(WORKER + args, capture_output=True, text=True, timeout=timeout)


def test_accepts_every_upstream_flag_plus_the_low_bit_ones():
    upstream_help = subprocess.run(
        [sys.executable, "-m", "fastchat.serve.model_worker", "--help"], capture_output=True, text=True, timeout=120
    )
    upstream_flags = set(re.findall(r"(--[a-z0-9][a-z0-9_-]*)", upstream_help.stdout + upstream_help.stderr))
    assert {"--model-path", "--controller-address", "--limit-worker-concurrency", "--device"} <= upstream_flags
    ours = option_strings(worker_arguments.build_parser())
    assert upstream_flags <= ours
    assert {"--bigdl_load", "--low-bit", "--low-bit-backend", "--trust-remote-code"} <= ours


def test_help_documents_the_new_flags():
    out = run(["--help"])
    text = out.stdout + out.stderr
    assert out.returncode == 0
    for flag in ("--bigdl_load", "--low-bit", "sym_int4", "--low-bit-backend", "--model-path"):
        assert flag in text


def test_bad_low_bit_is_an_argparse_error_listing_choices():
    out = run(["--bigdl_load", "--device", "cpu", "--low-bit", "int3"])
    assert out.returncode == 2
    assert "invalid choice: 'int3'" in out.stderr and "sym_int4" in out.stderr and "nf4" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--low-bit", "sym_int8"], "--low-bit only applies with --bigdl_load"),
        (["--bigdl_load", "--device", "cuda"], "runs on --device cpu or xpu"),
        (["--bigdl_load", "--device", "cpu", "--load-8bit"], "--load-8bit selects another loader"),
        (["--bigdl_load", "--device", "cpu", "--num-gpus", "2"], "one worker per GPU"),
    ],
)
def test_invalid_combinations_are_refused(args, message, mocker):
    error = mocker.patch("argparse.ArgumentParser.error", side_effect=SystemExit(2))
    with pytest.raises(SystemExit):
        worker_main.main(args)
    assert message in error.call_args.args[0]


def test_missing_model_path_is_one_error_line_not_a_traceback(tmp_path):
    out = run(["--bigdl_load", "--device", "cpu", "--model-path", str(tmp_path / "nope"), "--no-register"])
    assert out.returncode == 2
    assert "error:" in out.stderr and "Traceback" not in out.stderr


def test_a_damaged_checkpoint_is_one_line_with_the_traceback_in_the_log(tmp_path):
    """A model that does not load (here: weights cut off mid-file) stops the worker with
    one line naming the model and the cause; the traceback goes to the worker's log."""
    from helpers import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tinyllm-instruct")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    logs = tmp_path / "logs"
    env = {**os.environ, "LOGDIR": str(logs)}
    out = subprocess.run(WORKER + ["--bigdl_load", "--model-path", str(model), "--no-register",
                                   "--no-low-bit-cache"], capture_output=True, text=True, timeout=120, env=env)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"cannot load {model}: SafetensorError" in last and "traceback in" in last
    (log,) = logs.glob("model_worker_*.log")
    assert "Traceback" in log.read_text()


def test_xpu_without_intel_gpu_is_one_clear_error(tiny_llama):
    out = run(["--bigdl_load", "--device", "xpu", "--model-path", str(tiny_llama), "--no-register"])
    assert out.returncode == 2
    assert "xpu" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flags, expected", [
    ([], "default"),
    (["--low-bit-cache", "/tmp/lb"], "/tmp/lb"),
    (["--no-low-bit-cache"], None),
])
def test_low_bit_cache_flags_reach_the_worker(mocker, flags, expected):
    from fastchat_bigdl.common.paths import low_bit_cache_dir

    worker = mocker.patch.object(worker_main, "BigDLModelWorker")
    parser = worker_arguments.build_parser()
    args = parser.parse_args(["--bigdl_load", "--device", "cpu", *flags])
    worker_main.create_bigdl_worker(args)
    got = worker.call_args.kwargs["low_bit_cache"]
    assert got == (str(low_bit_cache_dir()) if expected == "default" else expected)
