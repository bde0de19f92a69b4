"""Worker API routes FastChat's worker lacks, added to its app by ``model_worker``."""
from __future__ import annotations

from fastapi import APIRouter

from fastchat_bigdl.common.chat_template import tokenizer_chat_template


def extra_worker_routes(worker) -> APIRouter:
    router = APIRouter()

    @router.post("/worker_get_chat_template")
    async def worker_get_chat_template():
        """The tokenizer's Jinja chat template, for prompts FastChat's conversation
        templates cannot express (tools). Its presence also tells the API server that
        this worker enforces the ``grammar`` generation parameter."""
        tokenizer = worker.tokenizer
        return {"chat_template": tokenizer_chat_template(tokenizer),
                "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}

    @router.post("/worker_engine_stats")
    async def worker_engine_stats():
        """How the engine runs: which forward decodes, and how many streams its batched
        decode steps carried (rows per step above 1 means concurrent streams shared calls)."""
        engine = worker.engine
        return {"decode_path": worker.decode_path, "decode_steps": engine.steps, "decode_rows": engine.batched_rows,
                "rows_per_step": engine.batched_rows / engine.steps if engine.steps else None,
                "active_streams": engine.active_streams}

    return router
