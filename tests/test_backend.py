import pytest

from fastchat_bigdl.lowbit import backend
from fastchat_bigdl.lowbit.backend import BackendError, resolve_backend


@pytest.fixture(autouse=True)
def fresh_resolution(monkeypatch):
    monkeypatch.delenv(backend.BACKEND_ENV, raising=False)
    resolve_backend.cache_clear()
    yield
    resolve_backend.cache_clear()


def installed():
    return [d for d in backend.LIBRARIES if backend.installed_version(d)]


def test_resolves_the_installed_library_with_sym_int4():
    chosen = resolve_backend()
    assert chosen.distribution == installed()[0]
    assert chosen.version == backend.installed_version(chosen.distribution)
    assert "sym_int4" in chosen.qtypes and "sym_int8" in chosen.qtypes


def test_env_var_forces_a_library(monkeypatch):
    dist = installed()[0]
    monkeypatch.setenv(backend.BACKEND_ENV, backend.LIBRARIES[dist])  # module name works too
    assert resolve_backend().distribution == dist


def test_unknown_library_name_is_a_clear_error():
    with pytest.raises(BackendError, match="unknown low-bit library 'torchao'.*ipex-llm, bigdl-llm"):
        resolve_backend("torchao")


def test_requested_library_missing_names_the_extras(monkeypatch):
    monkeypatch.setattr(backend, "installed_version", lambda dist: None)
    with pytest.raises(BackendError, match=r"bigdl-llm was requested but is not installed.*fastchat-bigdl\[bigdl\]"):
        resolve_backend("bigdl-llm")


def test_no_library_at_all_names_the_extras(monkeypatch):
    monkeypatch.setattr(backend, "installed_version", lambda dist: None)
    with pytest.raises(BackendError, match=r"no low-bit library is installed.*fastchat-bigdl\[cpu\].*\[xpu\]"):
        resolve_backend()


def test_only_backend_module_imports_the_low_bit_library():
    import pathlib
    import re

    root = pathlib.Path(backend.__file__).parent
    offenders = [
        p.name for p in root.glob("*.py")
        if p.name != "backend.py" and re.search(r"^\s*(from|import)\s+(ipex_llm|bigdl)", p.read_text(), re.M)
    ]
    assert offenders == []
