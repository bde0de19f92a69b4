"""The request-validation middleware itself, on a minimal ASGI app over real (in-process)
HTTP: checks run off the event loop under a time limit, defaults fill the body handed on."""
import asyncio
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fastchat_bigdl.api.request_checks import chat_defaults
from fastchat_bigdl.common.validation import PARSED_BODY, ValidateRequests


async def echo(request: Request):
    body = await request.json()
    return JSONResponse({"body": body, "parsed": request.scope.get("state", {}).get(PARSED_BODY)})


async def ping(request: Request):
    return JSONResponse({"pong": True})


def client_for(checks, **kwargs) -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/checked", echo, methods=["POST"]), Route("/ping", ping, methods=["POST"])])
    app.add_middleware(ValidateRequests, checks=checks, **kwargs)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_checks_run_off_the_event_loop_while_other_requests_are_served():
    threads = []

    def slow_check(data):  # what compiling a large schema looks like to the event loop
        threads.append(threading.current_thread())
        time.sleep(1.0)

    async def scenario():
        async with client_for({"/checked": slow_check}) as client:
            slow = asyncio.create_task(client.post("/checked", json={"a": 1}))
            await asyncio.sleep(0.1)
            started = time.perf_counter()
            pong = await client.post("/ping", json={})
            pong_seconds = time.perf_counter() - started
            return await slow, pong, pong_seconds

    slow, pong, pong_seconds = asyncio.run(scenario())
    assert slow.status_code == 200 and pong.status_code == 200
    assert pong_seconds < 0.5  # not stuck behind the 1 s check
    assert threads and threads[0] is not threading.main_thread()


def test_a_check_over_the_time_limit_is_a_clear_400():
    async def scenario():
        async with client_for({"/checked": lambda data: time.sleep(2)}, check_seconds=0.3) as client:
            started = time.perf_counter()
            response = await client.post("/checked", json={"a": 1})
            return response, time.perf_counter() - started

    response, seconds = asyncio.run(scenario())
    assert response.status_code == 400 and seconds < 1.5
    body = response.json()
    assert body["object"] == "error" and "longer than 0.3 s" in body["message"] and body["code"] == 40302


@pytest.mark.parametrize("sent, expected", [({}, 512), ({"max_tokens": None}, 512), ({"max_tokens": 7}, 7)])
def test_chat_default_max_tokens_reaches_the_app_in_body_and_parsed_form(sent, expected):
    async def scenario():
        async with client_for({"/checked": lambda data: None}, defaults={"/checked": chat_defaults(512)}) as client:
            return await client.post("/checked", json={"model": "m", **sent})

    answer = asyncio.run(scenario()).json()
    assert answer["body"]["max_tokens"] == expected and answer["parsed"]["max_tokens"] == expected


def test_no_default_cap_leaves_the_body_untouched():
    raw = b'{"model": "m",   "messages": []}'  # odd spacing: handed on byte for byte

    async def scenario():
        async with client_for({"/checked": lambda data: None}, defaults={"/checked": chat_defaults(0)}) as client:
            return await client.post("/checked", content=raw, headers={"content-type": "application/json"})

    assert asyncio.run(scenario()).json()["body"] == {"model": "m", "messages": []}
