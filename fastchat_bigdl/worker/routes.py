"""Worker API routes FastChat's worker lacks, added to its app by ``model_worker``."""
from __future__ import annotations

from fastapi import APIRouter

from fastchat_bigdl.common.chat_template import template_stop_tokens, tokenizer_chat_template


def special_token_ids(tokenizer) -> dict:
    """Text -> id of the tokenizer's special tokens (a grammar names a call opener such as
    Mistral's ``[TOOL_CALLS]`` by id)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids = {token.content: index for index, token in added.items() if getattr(token, "special", False)}
    ids.update({t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens})
    return ids


def extra_worker_routes(worker) -> APIRouter:
    router = APIRouter()

    @router.post("/worker_get_chat_template")
    async def worker_get_chat_template():
        """The tokenizer's Jinja chat template, for prompts FastChat's conversation
        templates cannot express (tools; every chat where ``render_with_template``). Its
        presence also tells the API server that this worker enforces the ``grammar``
        generation parameter."""
        tokenizer = worker.tokenizer
        template = tokenizer_chat_template(tokenizer)
        stops = template_stop_tokens(template, tokenizer) if template else []
        return {"chat_template": template,
                "render_with_template": getattr(worker, "prompts_need_template", False),
                "stop": stops, "stop_token_ids": [tokenizer.convert_tokens_to_ids(t) for t in stops],
                "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                "special_tokens": special_token_ids(tokenizer)}

    @router.post("/worker_engine_stats")
    async def worker_engine_stats():
        """How the engine runs: which forward decodes, and how many streams its batched
        decode steps carried (rows per step above 1 means concurrent streams shared calls)."""
        engine = worker.engine
        return {"decode_path": worker.decode_path, "decode_steps": engine.steps, "decode_rows": engine.batched_rows,
                "rows_per_step": engine.batched_rows / engine.steps if engine.steps else None,
                "active_streams": engine.active_streams,
                "kv_budget": engine.kv_budget.stats() if engine.kv_budget is not None else None}

    return router
