"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

Bodies are parsed here with pydantic (not by FastAPI's signature binding), so every client mistake becomes
a 400 in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` instead of FastAPI's 422;
an unknown model is a 404 with code ``model_not_found``. Streaming answers are Server-Sent Events: one
``data: {chunk}`` per token delta, a last chunk with ``finish_reason``, and ``data: [DONE]``. When the client
goes away, the generation job is interrupted so the queue moves on.

``finish_reason`` is ``"stop"`` (EOS or a stop string), ``"length"`` (``max_tokens`` or the context is full),
or, an extension OpenAI does not have, ``"abort"`` (vLLM's value) for a reply cut short before either: the
server shut down, or the request was stopped. Only the request's own connection stops it; image
Interrupts (``/sdapi/v1/interrupt``) and other clients never cut a reply.

Extra sampling fields beyond OpenAI's: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos`` (and
``seed``, which OpenAI has too). Defaults are OpenAI's (temperature 1, top_p 1); ``max_tokens`` defaults to the rest of
the context for chat and to 16 for legacy completions, as in OpenAI's API.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from modules.job_owner import api_owner
from modules.llm.engine import GenerationResult, PromptTooLong
from modules.llm.sampling import FIELD_NAMES, SamplingParams

log = logging.getLogger(__name__)

#: legacy /v1/completions default, as OpenAI documents it
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


# -- request bodies ----------------------------------------------------------------------------------------

#: OpenAI's own limit on stop sequences
MAX_STOP_SEQUENCES = 4


def _valid_text(value: Any) -> Any:
    """Reject a lone UTF-16 surrogate (JSON ``"\\ud800"``): it cannot be encoded, so it is the client's 422."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for text in texts:
        if isinstance(text, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            raise ValueError("the text holds a lone UTF-16 surrogate (e.g. \\ud800); send valid Unicode")
    return value


class _Sampling(BaseModel):
    # strict: a boolean is not a number and a string is not one either ("steps": true is an error), as in OpenAI
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extra field: generate max_tokens even past EOS (benchmarks)
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # accepted so clients that send their defaults work; asking for them is a clear 400 (see _check_unsupported)
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    # not implemented yet: asking for them is a 400 (see _check_unsupported), never silently ignored
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    suffix: str | None = None
    best_of: int | None = None

    _check_stop = field_validator("stop")(classmethod(lambda cls, v: _valid_text(v)))

    def params(self, default_max: int | None) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            max_new_tokens=default_max if max_tokens is None else max_tokens, stop=stop, seed=self.seed,
            ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]], None] = None

    _check_content = field_validator("content")(classmethod(lambda cls, v: _valid_text(v)))

    def text(self) -> str:
        """Content as text; OpenAI's list-of-parts form is accepted when every part is text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                               param="messages")
            _text_or_422(part["text"], "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Sampling):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False

    _check_prompt = field_validator("prompt")(classmethod(lambda cls, v: _valid_text(v)))


def _text_or_422(text: str, param: str) -> None:
    try:
        _valid_text(text)
    except ValueError as exc:
        raise ApiError(422, str(exc), param=param) from None


# -- errors --------------------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.payload())


#: SamplingParams field -> the API field that sets it, so messages name what the client sent
_API_NAMES = {"max_new_tokens": "max_tokens"}


def _sampling_error(exc: ValueError) -> ApiError:
    message = str(exc)
    for ours, theirs in _API_NAMES.items():
        message = message.replace(ours, theirs)
    param = next((_API_NAMES.get(n, n) for n in FIELD_NAMES if f"{_API_NAMES.get(n, n)}=" in message), None)
    return ApiError(400, message, param=param)


def _translate(exc: Exception) -> ApiError:
    from modules.llm.service import ModelNotFound, ModelUnusable
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ModelNotFound):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ModelUnusable):
        return ApiError(400, str(exc), param="model", code="model_not_loadable")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    from modules.llm.llamacpp_runtime import LlamaCppUnavailable
    if isinstance(exc, LlamaCppUnavailable):  # the server lacks a backend the model needs: not the client's fault
        return ApiError(503, str(exc), param="model", code="backend_unavailable", kind="server_error")
    if isinstance(exc, ValueError):
        return _sampling_error(exc)
    log.exception("OpenAI API request failed")
    return ApiError(500, f"{type(exc).__name__}: {exc}", kind="server_error")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        raw = await request.body()
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        status = 422 if "surrogate" in details else 400  # valid JSON, but text that cannot be encoded
        raise ApiError(status, f"invalid request: {details}", param=param) from None


# -- the router -----------------------------------------------------------------------------------------------

def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])

    def service():
        return ctx.llm

    engine_hash = engine_source_hash()

    def fingerprint(model: str) -> str:
        return serving_fingerprint(model, ctx.devices.dtype, ctx.devices.device, engine_hash)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "atelier"}

    @router.get("/models")
    async def list_models() -> JSONResponse:
        """The usable models; folders that cannot be loaded are only in ``unusable`` (Atelier's field, with
        the reason), so an OpenAI client never picks one."""
        models = await run_in_threadpool(service().list_models)
        return JSONResponse({"object": "list", "data": [model_card(m["name"]) for m in models if not m["error"]],
                             "unusable": [{"id": m["name"], "error": m["error"]} for m in models if m["error"]]})

    @router.get("/models/{model_id}")
    async def get_model(model_id: str) -> JSONResponse:
        names = await run_in_threadpool(service().model_names)
        if model_id not in names:
            return ApiError(404, f"the model {model_id!r} does not exist", param="model",
                            code="model_not_found").response()
        return JSONResponse(model_card(model_id))

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            body: ChatBody = await _parse(request, ChatBody)
            _check_n(body)
            _check_size(ctx, [m.text() for m in body.messages], "messages")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            params = _params(body, default_max=None)
            owner = api_owner(request.headers, api_auth=bool(ctx.opts.api_auth))
            run = await run_in_threadpool(lambda: service().chat(messages, params, model=body.model, owner=owner))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            return _translate(exc).response()
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(request, run.handle, run.result, lambda delta, reason: {
                "id": ident, "object": "chat.completion.chunk", "created": created, "model": run.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]},
                chat=True, include_usage=body.include_usage, usage_base={"id": ident, "created": created,
                                                                         "object": "chat.completion.chunk",
                                                                         "model": run.model})
        result = await _wait(request, run.handle, run.result)
        if isinstance(result, ApiError):
            return result.response()
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": run.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": _finish(result)}],
            "usage": result.usage(), "system_fingerprint": fingerprint(run.model)})

    @router.post("/completions")
    async def completions(request: Request):
        try:
            body: CompletionBody = await _parse(request, CompletionBody)
            _check_n(body)
            prompt = _one_prompt(body.prompt)
            if isinstance(prompt, str):
                _check_size(ctx, [prompt], "prompt")
            params = _params(body, default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)
            owner = api_owner(request.headers, api_auth=bool(ctx.opts.api_auth))
            handle, model = await run_in_threadpool(lambda: service().complete(prompt, params, model=body.model,
                                                                               owner=owner))
        except Exception as exc:  # noqa: BLE001
            return _translate(exc).response()
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = prompt if body.echo and isinstance(prompt, str) else ""
        if body.stream:
            return _sse(request, handle, handle.result, lambda delta, reason: {
                "id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": delta.get("content", ""), "logprobs": None,
                             "finish_reason": reason}]},
                chat=False, include_usage=body.include_usage, prefix=echo,
                usage_base={"id": ident, "created": created, "object": "text_completion", "model": model})
        result = await _wait(request, handle, handle.result)
        if isinstance(result, ApiError):
            return result.response()
        return JSONResponse({
            "id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": echo + result.text, "logprobs": None,
                         "finish_reason": _finish(result)}],
            "usage": result.usage()})

    return router


def _check_n(body: _Sampling) -> None:
    """Reject what this server cannot do instead of silently ignoring it."""
    if body.n is not None and body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported: Atelier returns one choice per request (n=1)",
                       param="n")
    for name in ("logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "functions", "function_call",
                 "suffix"):
        value = getattr(body, name)
        if value not in (None, False, [], {}, "") and not (name == "tool_choice" and value == "none"):
            raise ApiError(400, f"{name} is not supported by this server yet; leave it out", param=name)
    if body.best_of is not None and body.best_of != 1:
        raise ApiError(400, f"best_of={body.best_of} is not supported: Atelier generates one candidate (best_of=1)",
                       param="best_of")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise ApiError(400, f"response_format {body.response_format.get('type')!r} is not supported yet; only "
                            "{\"type\": \"text\"}", param="response_format")


def _check_size(ctx: Any, texts: list[str], param: str) -> None:
    """413 when the request's text is longer than the ``api.max_prompt_chars`` setting (a huge prompt would hold
    the only worker for a long time before the context-length check could even run)."""
    limit = ctx.settings.get("api.max_prompt_chars")
    size = sum(len(t) for t in texts)
    if size > limit:
        raise ApiError(413, f"the request holds {size} characters of text, more than the limit of {limit} "
                            "(setting api.max_prompt_chars)", param=param, code="prompt_too_long")


def serving_fingerprint(model: str, dtype: Any, device: Any, engine_hash: str) -> str:
    """OpenAI-style ``system_fingerprint``: stable for one serving configuration (model, dtype, device, engine
    code), different when any of them changes. It never carries anything per-request such as the seed."""
    import hashlib
    digest = hashlib.sha256(f"{model}|{dtype}|{device}|{engine_hash}".encode()).hexdigest()
    return f"fp_{digest[:12]}"


def engine_source_hash() -> str:
    """A hash of the LLM engine's code (model, engine, sampling), standing in for an engine version."""
    import hashlib
    from pathlib import Path
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("model.py", "engine.py", "sampling.py"):
        path = here / name
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _params(body: _Sampling, default_max: int | None) -> SamplingParams:
    """SamplingParams from the body; a missing max_tokens means "until the context is full"."""
    params = body.params(default_max if default_max is not None else 2**31 - 1)
    try:
        return params.validate()
    except ValueError as exc:
        raise _sampling_error(exc) from None


def _one_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return prompt[0]
    raise ApiError(400, "prompt must be one string or one list of token ids (batched prompts are not supported; "
                        "send one request per prompt - they are batched on the server)", param="prompt")


#: our GenerationResult.finish_reason -> the API's. OpenAI defines "stop" (EOS or a stop string) and "length"
#: (max_tokens or the context); it has no value for a reply cut short, so, as vLLM does, such a reply ends
#: with "abort" rather than passing for a finished one.
FINISH_REASONS = {"stop": "stop", "length": "length", "interrupted": "abort"}


def _finish(result: GenerationResult) -> str:
    return FINISH_REASONS[result.finish_reason]


async def _wait(request: Request, handle: Any, get_result: Callable[[], GenerationResult]):
    """Wait for a non-streamed result, interrupting the job if the client disconnects meanwhile."""
    waiter = asyncio.ensure_future(run_in_threadpool(get_result))
    interrupted = False
    while True:
        done, _pending = await asyncio.wait({waiter}, timeout=0.25)
        if done:
            break
        if not interrupted and await request.is_disconnected():
            handle.interrupt()  # nobody will read the reply; the job ends at its next token
            interrupted = True
    try:
        return waiter.result()
    except Exception as exc:  # noqa: BLE001
        return _translate(exc)


def _sse(request: Request, handle: Any, get_result: Callable[[], GenerationResult],
         chunk: Callable[[dict, str | None], dict], *, chat: bool, include_usage: bool,
         usage_base: dict[str, Any], prefix: str = "") -> StreamingResponse:
    """Stream *handle* as SSE chunks; always ends with ``data: [DONE]``. Interrupts the job on disconnect."""

    def line(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            if chat:
                yield line(chunk({"role": "assistant", "content": ""}, None))
            if prefix:
                yield line(chunk({"content": prefix}, None))
            stream = handle.events()
            while True:
                delta = await run_in_threadpool(next, stream, None)
                if delta is None:
                    break
                if delta.text:
                    yield line(chunk({"content": delta.text}, None))
            result = await run_in_threadpool(get_result)
            finished = True
            yield line(chunk({}, _finish(result)))
            if include_usage:
                yield line({**usage_base, "choices": [], "usage": result.usage()})
        except Exception as exc:  # noqa: BLE001 - the error goes to the client as a chunk, the server lives on
            finished = True
            yield line(_translate(exc).payload())
        finally:
            if not finished:
                handle.interrupt()  # client went away (the task was cancelled) before the reply ended
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
