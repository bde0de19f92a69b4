"""This package's worker inside a memory cgroup (``bench --memory-cgroup GIB``): "serves a 7B
agent chat on an 8 GB machine" measured on a bigger one, with the kernel enforcing the
limit as it would there (the worker's page cache, KV caches and all; the OOM killer acts
inside the group only).

``MemoryCgroup`` makes the group (cgroup v2, or v1's memory hierarchy; needs root or a
delegated subtree) and gives the command prefix that starts a process inside it:
``python -m fastchat_bigdl.bench.memory_cgroup <group> -- <command>`` joins the group, then
execs the command, so the worker's pid (which the bench watches) stays the same.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    pass


def _memory_hierarchy(root: Path = ROOT) -> tuple:
    """(directory new groups go in, "v1" or "v2")."""
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return root, "v2"
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return root / "memory", "v1"
    raise CgroupUnavailable(f"no memory cgroup controller under {root}")


class MemoryCgroup:
    def __init__(self, name: str, limit_mb: float, root: Path = ROOT):
        parent, self.version = _memory_hierarchy(root)
        self.path = parent / name
        self.limit_mb = limit_mb
        try:
            self.path.mkdir(exist_ok=True)
            limit = str(int(limit_mb * 2**20))
            # v2 gives a group memory.max only where the parent delegates the controller:
            # writing a file that is not there fails here instead of measuring without a limit
            (self.path / ("memory.max" if self.version == "v2" else "memory.limit_in_bytes")).write_text(limit)
            swap = self.path / "memory.swap.max"  # v2 with swap accounting: memory, not memory + swap
            if swap.exists():
                swap.write_text("0")
        except OSError as exc:
            raise CgroupUnavailable(f"cannot make a memory cgroup at {self.path}: {exc.strerror} "
                                    "(needs root or a delegated cgroup)") from None

    def _read(self, name: str) -> Optional[str]:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def command_prefix(self) -> List[str]:
        return [sys.executable, "-m", __name__, str(self.path), "--"]

    def peak_mb(self) -> Optional[float]:
        raw = self._read("memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes")
        return int(raw) / 2**20 if raw and raw.strip().isdigit() else None

    def oom_kills(self) -> Optional[int]:
        raw = self._read("memory.events" if self.version == "v2" else "memory.oom_control")
        for line in (raw or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def summary(self) -> dict:
        return {"limit_mb": self.limit_mb, "peak_mb": self.peak_mb(), "oom_kills": self.oom_kills(),
                "cgroup": self.version}

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass  # a process still inside: the group stays, empty groups cost nothing


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m fastchat_bigdl.bench.memory_cgroup <cgroup dir> -- <command ...>")
    Path(argv[0], "cgroup.procs").write_text(str(os.getpid()))
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main()
