"""Converted low-bit weights on disk, so only the first start of a model pays for conversion.

An entry is named by the model's absolute path, the low-bit format, the library and
its version, and the load dtype; it records the stamps (name, size, mtime) of the model's
files and of every file it holds itself (a checksum would cost seconds per start on a
multi-GB model; partial writes are already prevented by the rename below). A changed model (stale) or a damaged entry
(corrupt) is rebuilt with a warning. Entries are written to a temporary sibling and
renamed into place, so two workers starting on the same model never see a half-written
entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import transformers

from fastchat_bigdl.lowbit.backend import LowBitBackend

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: our own safetensors layout (lowbit/converted_weights.py)
MANIFEST = "fastchat_bigdl_low_bit.json"


def file_stamps(directory, skip: str = "") -> dict:
    """name -> [size, mtime_ns] of the files in ``directory``."""
    stamps = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith(".") and entry.name != skip:
            st = entry.stat()
            stamps[entry.name] = [st.st_size, st.st_mtime_ns]
    return stamps


class LowBitCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry_dir(self, model_path: str, low_bit: str, backend: LowBitBackend, dtype: str) -> Path:
        identity = json.dumps([os.path.abspath(model_path), low_bit, backend.distribution, backend.version,
                               transformers.__version__, dtype, FORMAT])
        name = f"{Path(model_path).name}-{low_bit}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
        return self.root / name

    def _check(self, entry: Path, model_path: str) -> Optional[str]:
        """None if the entry is usable, else why not (a warning for the log)."""
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            return f"unreadable manifest ({exc})"
        if manifest.get("model_stamps") != file_stamps(model_path):
            return "the model's files changed since it was written (stale)"
        if manifest.get("files") != file_stamps(entry, skip=MANIFEST):
            return "its files were changed or are missing (corrupt)"
        return None

    def load_or_build(self, model_path: str, low_bit: str, backend: LowBitBackend, dtype: str,
                      load: Callable[[Path], object], build: Callable[[], object],
                      save: Callable[[object, Path], None]):
        """Return (model, hit): ``load(entry)`` on a good entry, else ``build()`` and
        ``save(model, directory)`` it."""
        entry = self.entry_dir(model_path, low_bit, backend, dtype)
        if entry.is_dir():
            problem = self._check(entry, model_path)
            if problem is None:
                try:
                    logger.info("Loading %s weights from the low-bit cache %s", low_bit, entry)
                    return load(entry), True
                except Exception as exc:  # noqa: BLE001 - any failure to load means rebuild
                    problem = f"it does not load ({type(exc).__name__}: {exc}) (corrupt)"
            logger.warning("Rebuilding the low-bit cache entry %s: %s", entry, problem)
            shutil.rmtree(entry, ignore_errors=True)
        model = build()
        self._save(model, entry, model_path, save)
        return model, False

    def _save(self, model, entry: Path, model_path: str, save: Callable[[object, Path], None]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=self.root))
        try:
            save(model, tmp)
            manifest = {"format": FORMAT, "source": os.path.abspath(model_path),
                        "model_stamps": file_stamps(model_path), "files": file_stamps(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            try:
                os.rename(tmp, entry)
                logger.info("Saved the low-bit weights to %s", entry)
            except OSError:
                logger.info("Another worker saved %s first; keeping theirs", entry)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written is not fatal
            logger.warning("Could not save the low-bit cache entry %s: %s", entry, exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
