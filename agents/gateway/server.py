"""The OpenAI-compatible HTTP server in front of one policy engine.

Routes (FastAPI): ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``; the
same under ``/sessions/{sid}/v1/...``, where ``sid`` names the episode a call belongs to (a client
that cannot change its path may send the episode id as its API key instead: ``Authorization:
Bearer <sid>``); ``POST /sessions/{sid}/reward`` with ``{"reward": x}`` (once per episode: a second
post is refused with 409) and ``GET /sessions/{sid}`` (the episode as recorded).

One gateway per rollout worker, in the worker's process, in front of the worker's own engine: the
calls of the worker's episodes reach the engine without another network hop, and concurrent calls
are gathered into one batched ``generate`` (``Batcher``), which is where an engine's speed comes from.

A call is recorded in its episode (``Episode.calls``) as soon as the engine returns, before the
response is written: a client that disconnects mid-call loses nothing already generated.
Streaming is not supported; a request with ``stream: true`` gets one clear 400.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from treeplay.agents.base import Completion, Policy, TokenIds
from treeplay.agents.gateway.tokens import Conversation, Rendered, RequestError, parse_tool_calls
from treeplay.engines.contract import decode


@dataclass
class Call:
    """One served call of an episode, as the policy saw and wrote it."""

    index: int
    branch: int
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str  # the raw completion (tool-call blocks included)
    finish_reason: str
    replayed: bool = False  # answered from a replay table, not generated
    drift: str | None = None  # why this call started a new branch
    divergence: str | None = None  # why a replayed call had to be generated after all


@dataclass
class Episode:
    """Everything one episode (session) was served, and its reward."""

    sid: str
    conversation: Conversation
    calls: list[Call] = field(default_factory=list)
    reward: float | None = None
    replay: list[Call] | None = None  # tree mode: the recorded calls to answer from, in order
    replaying: bool = True  # false after a divergence: the rest of the episode is live
    max_calls: int | None = None  # calls beyond this many are refused
    live: bool = False  # run by treeplay itself (AgentSearch): its next call is expected until it is closed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    created: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        return {"sid": self.sid, "reward": self.reward, "branches": len(self.conversation.branches),
                "calls": [{"index": c.index, "branch": c.branch, "prompt_tokens": len(c.prompt_ids),
                           "completion_tokens": len(c.completion_ids), "text": c.text,
                           "finish_reason": c.finish_reason, "replayed": c.replayed, "drift": c.drift,
                           "divergence": c.divergence} for c in self.calls]}


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of a request; requests with equal settings share an engine call."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]


class Batcher:
    """Gathers concurrent generate requests into batched engine calls, one engine call at a time.

    The engine runs on one background thread (engines are not thread-safe); while it works, new
    requests queue up, and the next call takes all of them that share sampling settings. An idle
    batcher's first request waits for company while requests keep coming (gaps under ``window_s``),
    at most ``max_wait_s``: an agent's next call arrives only after its client has read the last
    reply, so a fixed short window sends most calls alone.

    When the gateway knows how many episodes are running (``expected``: the live episodes treeplay
    runs itself, each of which will call again until it is closed), the wait instead lasts until
    that many requests are queued, at most ``expect_wait_s``: a burst of calls from every running
    episode then becomes one engine call, not a first call of the early arrivals and a second of
    the rest.
    """

    def __init__(self, policy: Policy, window_s: float = 0.005, max_batch: int = 64, seed: int = 0,
                 max_wait_s: float = 0.05, expect_wait_s: float = 0.25,
                 expected: Callable[[], int] | None = None) -> None:
        self.policy = policy
        self.window_s = window_s
        self.max_wait_s = max_wait_s
        self.expect_wait_s = expect_wait_s
        self.expected = expected
        self.max_batch = max_batch
        self._seeds = random.Random(seed)
        self.calls = 0
        self.batch_sizes: list[int] = []
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="treeplay-engine")

    async def generate(self, ids: list[int], sampling: Sampling) -> Completion:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((ids, sampling, fut))
        # Shielded: a client that goes away does not cancel the generation (it is recorded anyway).
        return await asyncio.shield(fut)

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            # Gather company: keep taking requests while they keep arriving (a gap of window_s ends
            # the wait), for at most max_wait_s, up to max_batch; or, with live episodes known,
            # until each of them has a request queued, for at most expect_wait_s.
            start = loop.time()
            while len(items) < self.max_batch:
                while not self._queue.empty() and len(items) < self.max_batch:
                    items.append(self._queue.get_nowait())
                expected = min(self.max_batch, self.expected()) if self.expected is not None else 0
                if expected > 1:  # live episodes known: wait until each has a request queued
                    if len(items) >= expected:
                        break
                    left = start + self.expect_wait_s - loop.time()
                    timeout = min(self.window_s or 0.005, left)  # re-check the live count at this pace
                else:
                    left = start + self.max_wait_s - loop.time()
                    timeout = min(self.window_s, left)
                if len(items) >= self.max_batch or timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    if expected <= 1:
                        break  # a gap in the arrivals ends the wait
            groups: dict[Sampling, list] = {}
            for it in items:
                groups.setdefault(it[1], []).append(it)
            for sampling, group in groups.items():
                self.calls += 1
                self.batch_sizes.append(len(group))
                seed = self._seeds.randrange(2**31)  # one per engine call, in a fixed order
                try:
                    out = await loop.run_in_executor(self._pool, lambda g=group, s=sampling, sd=seed: self.policy.generate(
                        [TokenIds(ids) for ids, _, _ in g], n=1, max_tokens=s.max_tokens, temperature=s.temperature,
                        top_p=s.top_p, stop=list(s.stop) or None, seed=sd))
                except Exception as e:  # noqa: BLE001 - every waiting request gets the engine's error
                    for _, _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, _, fut), samples in zip(group, out, strict=True):
                    if not fut.done():
                        fut.set_result(samples[0])

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


class Gateway:
    """Episodes and the engine behind the HTTP routes (``app()`` builds the FastAPI app).

    Args:
        policy: The engine (``agents.base.Policy``); its ``tokenizer`` renders chat templates.
        model_name: What ``/v1/models`` lists (any name a client sends is accepted).
        default_max_tokens: For requests that name no ``max_tokens``.
        window_s / max_batch: The batcher's settings.
        template: "model": chat requests are rendered with the tokenizer's chat template; "plain":
            the messages' contents joined as they are (base models without a chat format).
        temperature: When set, every call is sampled at this temperature whatever the client asks
            (held-out evaluation of an agent program: 0 is greedy); None: the client's.
    """

    def __init__(self, policy: Policy, model_name: str = "treeplay", default_max_tokens: int = 128,
                 window_s: float = 0.005, max_batch: int = 64, seed: int = 0, template: str = "model",
                 temperature: float | None = None) -> None:
        if template not in ("model", "plain"):
            raise ValueError(f"template must be 'model' or 'plain', got {template!r}")
        if temperature is not None and not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        self.template = template
        self.temperature = temperature
        self.policy = policy
        self.tokenizer = policy.tokenizer  # type: ignore[attr-defined]
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.batcher = Batcher(policy, window_s, max_batch, seed, expected=self.live_episodes)
        self.episodes: dict[str, Episode] = {}
        self._live = 0  # live episodes open (they are opened and closed from the agent threads)
        self._live_lock = threading.Lock()

    # -- episodes --------------------------------------------------------------------------------

    def open(self, sid: str | None = None, replay: list[Call] | None = None, max_calls: int | None = None,
             live: bool = False) -> Episode:
        """Start an episode (a fresh id unless ``sid`` is given); ``replay``: the calls to answer
        from, in order, as long as the requests match them token for token. ``live``: the caller
        runs the episode and ``close``s it when it ends; until then the batcher expects its calls."""
        sid = sid or uuid.uuid4().hex
        if sid in self.episodes:
            raise RequestError(f"episode {sid!r} already exists")
        ep = Episode(sid, Conversation(self.tokenizer, self.template), replay=list(replay) if replay else None,
                     max_calls=max_calls, live=live)
        with self._live_lock:
            self.episodes[sid] = ep
            self._live += live
        return ep

    def close(self, sid: str) -> Episode | None:
        """Forget the episode ``sid`` (its records are the caller's now); None if there is none."""
        with self._live_lock:
            ep = self.episodes.pop(sid, None)
            self._live -= bool(ep is not None and ep.live)
        return ep

    def live_episodes(self) -> int:
        """Episodes treeplay is running whose next call the batcher may wait for."""
        return self._live

    def episode(self, sid: str) -> Episode:
        """The episode ``sid``, opened on its first call."""
        return self.episodes.get(sid) or self.open(sid)

    def set_reward(self, sid: str, reward: Any) -> None:
        ep = self.episodes.get(sid)
        if ep is None:
            raise KeyError(sid)
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or reward != reward:
            raise RequestError("reward must be a finite number")
        if ep.reward is not None:
            raise PermissionError(f"episode {sid!r} already has a reward ({ep.reward:g}); it is set once")
        ep.reward = float(reward)

    # -- calls -----------------------------------------------------------------------------------

    def sampling(self, body: dict[str, Any]) -> Sampling:
        if body.get("stream"):
            raise RequestError("streaming is not supported by the treeplay gateway yet; send stream=false")
        n = body.get("n", 1)
        if n not in (1, None):
            raise RequestError("n must be 1 (ask again for more samples; each call is one step of an episode)")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        stop = body.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise RequestError("max_tokens must be a positive integer")
        for name, v in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(f"{name} must be a number")
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of strings")
        if self.temperature is not None:
            temperature = self.temperature
        return Sampling(max_tokens, float(1.0 if temperature is None else temperature),
                        float(1.0 if top_p is None else top_p), tuple(stop))

    async def serve(self, ep: Episode, rendered_fn, sampling: Sampling) -> tuple[Call, dict[str, Any]]:
        """Answer one call of ``ep``: from its replay table while the requests match it, else from
        the engine; record it; return the call and the assistant message."""
        async with ep.lock:
            index = len(ep.calls)
            if ep.max_calls is not None and index >= ep.max_calls:
                raise RequestError(f"episode {ep.sid!r} has made its {ep.max_calls} calls (agent.max_calls)")
            rendered: Rendered = rendered_fn(ep.conversation)
            recorded = ep.replay[index] if ep.replay is not None and ep.replaying and index < len(ep.replay) else None
            divergence = None
            if recorded is not None and recorded.prompt_ids != rendered.ids:
                divergence = (f"call {index} asked for a different prompt than the recorded one "
                              f"({len(rendered.ids)} vs {len(recorded.prompt_ids)} tokens)")
                ep.replaying, recorded = False, None
            if recorded is not None:
                ids, logprobs, finish = list(recorded.completion_ids), list(recorded.logprobs), recorded.finish_reason
                text = recorded.text
            else:
                c = await self.batcher.generate(rendered.ids, sampling)
                # The text is what the ids decode to (the ids are what was sampled and is trained on).
                ids, logprobs, finish = list(c.token_ids), list(c.logprobs), c.finish_reason
                text = decode(self.tokenizer, ids)
            content, tool_calls = parse_tool_calls(text, f"call_{ep.sid[:12]}_{index}")
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not tool_calls else None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            call = Call(index, rendered.branch, rendered.ids, ids, logprobs, text, finish,
                        replayed=recorded is not None, drift=rendered.drift, divergence=divergence)
            ep.conversation.commit(rendered, ids, logprobs, text, message)
            ep.calls.append(call)
            return call, message

    # -- the HTTP app ----------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI(title="treeplay gateway")
        gw = self

        def error(status: int, message: str) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

        def session_of(request: Request, sid: str | None) -> str:
            if sid:
                return sid
            auth = request.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            return key if key and key not in ("EMPTY", "none", "sk-none") else uuid.uuid4().hex

        async def body_of(request: Request) -> dict[str, Any]:
            try:
                body = await request.json()
            except ValueError:
                raise RequestError("the request body is not JSON") from None
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            return body

        def usage(call: Call) -> dict[str, int]:
            return {"prompt_tokens": len(call.prompt_ids), "completion_tokens": len(call.completion_ids),
                    "total_tokens": len(call.prompt_ids) + len(call.completion_ids)}

        def extras(body: dict[str, Any], call: Call) -> dict[str, Any]:
            if not body.get("return_token_ids"):
                return {}
            return {"prompt_token_ids": call.prompt_ids, "completion_token_ids": call.completion_ids,
                    "completion_logprobs": call.logprobs, "replayed": call.replayed}

        async def chat(request: Request, sid: str | None = None):
            try:
                body = await body_of(request)
                sampling = gw.sampling(body)
                ep = gw.episode(session_of(request, sid))
                messages, tools = body.get("messages"), body.get("tools")
                call, message = await gw.serve(ep, lambda conv: conv.prompt(conv.render_chat(messages, tools)), sampling)
            except RequestError as e:
                return error(400, str(e))
            except ValueError as e:  # the engine refused the prompt (too long for its context, ...)
                return error(400, str(e).splitlines()[0] if str(e) else type(e).__name__)
            finish = "tool_calls" if "tool_calls" in message else ("length" if call.finish_reason == "length" else "stop")
            # A JSONResponse of plain values: FastAPI's encoder would walk them again for nothing.
            return JSONResponse({"id": f"chatcmpl-{ep.sid[:12]}-{call.index}", "object": "chat.completion",
                                 "created": int(time.time()), "model": body.get("model") or gw.model_name,
                                 "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                                 "usage": usage(call), **extras(body, call)})

        async def completions(request: Request, sid: str | None = None):
            try:
                body = await body_of(request)
                sampling = gw.sampling(body)
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise RequestError("prompt must be one string")
                ep = gw.episode(session_of(request, sid))
                call, _ = await gw.serve(ep, lambda conv: conv.prompt(prompt, raw=True), sampling)
            except RequestError as e:
                return error(400, str(e))
            except ValueError as e:
                return error(400, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return JSONResponse({"id": f"cmpl-{ep.sid[:12]}-{call.index}", "object": "text_completion",
                                 "created": int(time.time()), "model": body.get("model") or gw.model_name,
                                 "choices": [{"index": 0, "text": call.text, "logprobs": None,
                                              "finish_reason": "length" if call.finish_reason == "length" else "stop"}],
                                 "usage": usage(call), **extras(body, call)})

        def models():
            return {"object": "list", "data": [{"id": gw.model_name, "object": "model", "owned_by": "treeplay"}]}

        app.post("/v1/chat/completions")(chat)
        app.post("/sessions/{sid}/v1/chat/completions")(chat)
        app.post("/v1/completions")(completions)
        app.post("/sessions/{sid}/v1/completions")(completions)
        app.get("/v1/models")(models)
        app.get("/sessions/{sid}/v1/models")(lambda sid: models())

        @app.post("/sessions/{sid}/reward")
        async def reward(sid: str, request: Request):
            try:
                body = await body_of(request)
                gw.set_reward(sid, body.get("reward"))
            except RequestError as e:
                return error(400, str(e))
            except KeyError:
                return error(404, f"no episode {sid!r}")
            except PermissionError as e:
                return error(409, str(e))
            return {"sid": sid, "reward": gw.episodes[sid].reward}

        @app.get("/sessions/{sid}")
        async def show(sid: str):
            ep = gw.episodes.get(sid)
            return ep.summary() if ep is not None else error(404, f"no episode {sid!r}")

        return app


class GatewayServer:
    """A ``Gateway`` served over HTTP on loopback from a background thread (uvicorn).

    ``url`` is the server's root; a client's ``base_url`` is ``url + "/v1"``, or
    ``session_url(sid)`` for one episode."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        import socket

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.gateway.app(), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="treeplay-gateway", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the gateway did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def session_url(self, sid: str) -> str:
        return f"{self.url}/sessions/{sid}/v1"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.gateway.batcher.close()

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
