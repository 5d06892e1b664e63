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
``seed``, which OpenAI has too), and ``speculative`` (speculative decoding with the model's draft: absent =
as the ``llm.draft_models`` setting says, ``true`` = required, a 400 naming the setting when the model has no
usable draft, ``false`` = off; docs/speculative.md). Defaults are OpenAI's (temperature 1, top_p 1);
``max_tokens`` defaults to the rest of
the context for chat and to 16 for legacy completions, as in OpenAI's API, and, as there, a prompt plus
``max_tokens`` over the context is a 400 (``context_length_exceeded``), never a silently shortened reply.
``response_format`` (``json_object`` / ``json_schema``) constrains decoding (modules/llm/json_constraint.py).
Every field, error and what is not supported: docs/openai-api.md.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from modules.job_owner import api_owner
from modules.llm.engine import GenerationResult, PromptTooLong, context_length, eos_token_ids
from modules.llm.json_constraint import GrammarCompiler, SchemaError, schema_for
from modules.llm.openai_logprobs import CompletionLogprobs, chat_entries, merge
from modules.llm.sampling import FIELD_NAMES, SamplingParams

log = logging.getLogger(__name__)

#: legacy /v1/completions default, as OpenAI documents it
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: defaults of the llm.api_max_n / llm.api_max_logprobs settings (OpenAI allows 20 top logprobs)
DEFAULT_MAX_N = 16
DEFAULT_MAX_LOGPROBS = 20


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
    # Atelier's extra field (the openai client sends it in extra_body): speculative decoding with the model's
    # draft (llm.draft_models); absent = as the setting says, true = required (400 without a draft), false = off
    speculative: bool | None = None
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
    # OpenAI features that would change the reply: a 400 unless they ask for plain text (see _check_unsupported).
    # Fields that do not change it (store, metadata, service_tier, parallel_tool_calls, prediction, ...) are
    # ignored like any unknown field.
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    reasoning_effort: str | None = None

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
    from modules.llm.speculative import DraftIncompatible, SpeculativeUnavailable
    if isinstance(exc, (DraftIncompatible, SpeculativeUnavailable)):
        return ApiError(400, str(exc), param="speculative", code="speculative_unavailable")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    from modules.llm.paged.kv_memory import KVCacheExhausted
    if isinstance(exc, KVCacheExhausted):
        return ApiError(400, str(exc), param="max_tokens", code="kv_cache_exhausted")
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
    grammars = GrammarCompiler()  # response_format schemas -> token masks, per model tokenizer

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
            n, k = _check_unsupported(ctx, body, chat=True)
            _check_size(ctx, [m.text() for m in body.messages], "messages")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            params = _params(body, default_max=None)
            files = await run_in_threadpool(service().files, body.model)
            prompt_len = await run_in_threadpool(_chat_prompt_len, files, messages)
            params.max_new_tokens = _completion_budget(body, files, [prompt_len], chat=True)
            params.constraint = await run_in_threadpool(_response_format, ctx, grammars, body, files)
            owner = api_owner(request.headers, api_auth=bool(ctx.opts.api_auth))
            speculative = _speculative(body, n)
            runs = await run_in_threadpool(lambda: [
                service().chat(messages, p, model=body.model, owner=owner, logprobs=k, fire_user=i == 0,
                               speculative=speculative)
                for i, p in enumerate(_seeded(params, n))])
            tokenizer = service().files(runs[0].model).tokenizer
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            return _translate(exc).response()
        model = runs[0].model
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
        choices = [_Choice(i, run.handle, run.result, chat=True, tokenizer=tokenizer, logprobs=k is not None)
                   for i, run in enumerate(runs)]
        if body.stream:
            return _sse(request, choices, base, n=n, include_usage=body.include_usage)
        results = await _wait_all(request, choices)
        if isinstance(results, ApiError):
            return results.response()
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": r.text, "refusal": None},
                         "logprobs": c.final_logprobs(r), "finish_reason": _finish(r)}
                        for c, r in zip(choices, results)],
            "usage": _usage(results, n=n), "system_fingerprint": fingerprint(model), **_speculative_stats(results)})

    @router.post("/completions")
    async def completions(request: Request):
        try:
            body: CompletionBody = await _parse(request, CompletionBody)
            n, k = _check_unsupported(ctx, body, chat=False)
            prompts = _prompts(body.prompt)
            _check_size(ctx, [p for p in prompts if isinstance(p, str)], "prompt")
            score_only = body.echo and _max_tokens(body) == 0  # echo the prompt's logprobs, generate nothing
            params = _params(body, default_max=COMPLETIONS_DEFAULT_MAX_TOKENS, allow_zero=score_only)
            files = await run_in_threadpool(service().files, body.model)
            lengths = await run_in_threadpool(lambda: [
                len(p) if isinstance(p, list) else len(files.tokenizer.encode(p, add_bos=True)) for p in prompts])
            budget = _completion_budget(body, files, lengths, chat=False, default=COMPLETIONS_DEFAULT_MAX_TOKENS,
                                        score_only=score_only)
            if not score_only:
                params.max_new_tokens = budget
            params.constraint = await run_in_threadpool(_response_format, ctx, grammars, body, files)
            owner = api_owner(request.headers, api_auth=bool(ctx.opts.api_auth))
            echo_logprobs = body.echo and k is not None
            speculative = _speculative(body, n * len(prompts))

            def submit() -> list[tuple[Any, str]]:
                return [service().complete(prompt, p, model=body.model, owner=owner, logprobs=k,
                                           prompt_logprobs=echo_logprobs, speculative=speculative)
                        for prompt in prompts for p in _seeded(params, n)]

            submitted = await run_in_threadpool(submit)
            model = submitted[0][1]
            tokenizer = service().files(model).tokenizer
        except Exception as exc:  # noqa: BLE001
            return _translate(exc).response()
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "object": "text_completion", "created": created, "model": model}
        choices = []
        for i, (handle, _model) in enumerate(submitted):
            prompt = prompts[i // n]
            echo = "" if not body.echo else prompt if isinstance(prompt, str) else \
                tokenizer.decode(list(prompt), skip_special_tokens=True)
            choices.append(_Choice(i, handle, handle.result, chat=False, tokenizer=tokenizer,
                                   logprobs=k is not None, echo=echo, echo_logprobs=echo_logprobs,
                                   score_only=score_only))
        if body.stream:
            return _sse(request, choices, base, n=n, include_usage=body.include_usage)
        results = await _wait_all(request, choices)
        if isinstance(results, ApiError):
            return results.response()
        return JSONResponse({
            **base, "choices": [{"index": c.index, "text": c.echo + ("" if score_only else r.text),
                                 "logprobs": c.final_logprobs(r), "finish_reason": _finish(r)}
                                for c, r in zip(choices, results)],
            "usage": _usage(results, n=n, score_only=score_only), **_speculative_stats(results)})

    return router


def _limit(ctx: Any, key: str, default: int) -> int:
    try:
        return int(ctx.settings.get(key))
    except (KeyError, TypeError, ValueError):
        return default


def _check_unsupported(ctx: Any, body: _Sampling, *, chat: bool) -> tuple[int, int | None]:
    """Reject what this server cannot do instead of silently ignoring it; return (n, logprobs k or None)."""
    if not body.model:
        raise ApiError(400, "the request names no model: set \"model\" to one of GET /v1/models's ids",
                       param="model", code="model_required")
    max_n = _limit(ctx, "llm.api_max_n", DEFAULT_MAX_N)
    n = 1 if body.n is None else body.n
    if not 1 <= n <= max_n:
        raise ApiError(400, f"n={n} must be between 1 and {max_n} (setting llm.api_max_n)", param="n")
    for name in ("tools", "functions", "function_call", "suffix"):
        if getattr(body, name) not in (None, [], {}, ""):
            raise ApiError(400, f"{name} is not supported by this server; leave it out", param=name)
    if body.modalities is not None and set(body.modalities) - {"text"}:
        raise ApiError(400, f"modalities {sorted(set(body.modalities) - {'text'})} are not supported: this server "
                            "answers with text only (leave modalities out or [\"text\"])", param="modalities")
    for name, what in (("audio", "audio output"), ("web_search_options", "web search"),
                       ("reasoning_effort", "reasoning models")):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} is not supported by this server (no {what}); leave it out", param=name)
    if body.tool_choice not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by this server (no tools); leave it out",
                       param="tool_choice")
    if body.best_of is not None and body.best_of != n:
        raise ApiError(400, f"best_of={body.best_of} is not supported: Atelier generates n candidates and returns "
                            "them all (leave best_of out)", param="best_of")
    max_k = _limit(ctx, "llm.api_max_logprobs", DEFAULT_MAX_LOGPROBS)
    if chat:
        if body.logprobs not in (None, True, False):
            raise ApiError(400, "logprobs must be true or false for chat (top_logprobs says how many "
                                "alternatives)", param="logprobs")
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        k = (body.top_logprobs or 0) if body.logprobs else None
        param = "top_logprobs"
    else:
        if isinstance(body.logprobs, bool) or body.top_logprobs is not None:
            raise ApiError(400, "completions take logprobs as an integer (the number of alternatives), not "
                                "logprobs: true / top_logprobs", param="logprobs")
        k = body.logprobs
        param = "logprobs"
    if k is not None and not 0 <= k <= max_k:
        raise ApiError(400, f"{param}={k} must be between 0 and {max_k} (setting llm.api_max_logprobs)", param=param)
    return n, k


def _chat_prompt_len(files: Any, messages: list[dict[str, Any]]) -> int:
    """Prompt tokens of *messages* under the model's chat template (what the service will render)."""
    from modules.llm.service import check_messages, render_prompt
    try:
        check_messages(messages)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    return len(render_prompt(files, messages)[1])


def _completion_budget(body: _Sampling, files: Any, prompt_lens: list[int], *, chat: bool,
                       default: int | None = None, score_only: bool = False) -> int:
    """max_tokens as OpenAI counts it: the prompt plus max_tokens must fit the model's context, else a 400
    saying by how much (the API never drops messages or shortens a reply to fit; the Chat tab does). No
    max_tokens means the rest of the context (chat) or *default* (legacy completions, 16)."""
    ctx_len = context_length(files)
    longest = max(prompt_lens)
    what = "in the messages" if chat else "in your prompt"
    if longest >= ctx_len:
        raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens. However, your "
                            f"{'messages' if chat else 'prompt'} resulted in {longest} tokens, which leaves no room "
                            "for a completion. Please reduce the length of the "
                            f"{'messages' if chat else 'prompt'}.",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    asked = _max_tokens(body)
    if asked is None and default is None:
        return ctx_len - longest
    wanted = 0 if score_only else asked if asked is not None else default
    if longest + wanted > ctx_len:
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise ApiError(400, f"This model's maximum context length is {ctx_len} tokens. However, you requested "
                            f"{longest + wanted} tokens ({longest} {what}, {wanted} in the completion). Please "
                            f"reduce the length of the {'messages' if chat else 'prompt'} or {name}.",
                       param=name, code="context_length_exceeded")
    return max(1, wanted)


def _response_format(ctx: Any, grammars: GrammarCompiler, body: _Sampling, files: Any) -> Any:
    """The constraint spec for the body's response_format (None for text); 400s name what is wrong."""
    if body.response_format is None:
        return None
    try:
        schema = schema_for(body.response_format)
    except SchemaError as exc:
        raise ApiError(400, str(exc), param="response_format",
                       code="unsupported_response_format" if exc.unsupported else "invalid_response_format") from None
    if schema is None:
        return None
    if body.ignore_eos:
        raise ApiError(400, "ignore_eos cannot be combined with response_format: the reply must end once the JSON "
                            "is complete", param="ignore_eos")
    from modules.llm.service import ATELIER
    backend = ctx.llm.backend(body.model)
    if backend != ATELIER:
        raise ApiError(400, f"response_format needs Atelier's own engine, but {body.model} runs on "
                            f"{backend}; set the llm.gguf_backend setting to \"atelier\"",
                       param="response_format", code="unsupported_response_format")
    try:
        return grammars.compile(schema, files.tokenizer, int(files.config.vocab_size), eos_token_ids(files))
    except SchemaError as exc:
        raise ApiError(400, str(exc), param="response_format",
                       code="unsupported_json_schema" if exc.unsupported else "invalid_json_schema") from None


def _max_tokens(body: _Sampling) -> int | None:
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


def _params(body: _Sampling, default_max: int | None, *, allow_zero: bool = False) -> SamplingParams:
    """SamplingParams from the body; a missing max_tokens means "until the context is full". With
    *allow_zero* (echo scoring), max_tokens 0 runs one step whose token is then dropped."""
    params = body.params(default_max if default_max is not None else 2**31 - 1)
    if allow_zero and params.max_new_tokens == 0:
        params.max_new_tokens = 1
    if body.logit_bias:
        bias = {}
        for key, value in body.logit_bias.items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id: keys are token ids as strings "
                                    "(e.g. {\"50256\": -100})", param="logit_bias") from None
        params.logit_bias = bias
    try:
        return params.validate()
    except ValueError as exc:
        raise _sampling_error(exc) from None


def _speculative(body: _Sampling, sequences: int) -> bool | None:
    """What the request's generations ask of speculative decoding. Speculative decoding runs one sequence at
    a time, so a request of several (n > 1, batched prompts) that leaves the field out decodes them batched
    together instead; asking for it explicitly runs each speculatively, one after another."""
    if body.speculative is None and sequences > 1:
        return False
    return body.speculative


def _seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """*n* copies of *params* with different seeds derived from one (the request's, or a random one), so
    n samples differ and a seeded request replays."""
    if n == 1:
        return [params]
    base = params.with_seed().seed
    return [replace(params, seed=(base + i) % (2**63)) for i in range(n)]


def _prompts(prompt: Any) -> list[str | list[int]]:
    """The prompts of a completions body: one string, one token list, or a list of either (a batch)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty: give a string, a list of token ids, or a list of those",
                       param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, list) and p for p in prompt) or all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ApiError(400, "prompt must be a string, a list of token ids, a list of strings or a list of token-id "
                        "lists (not a mix, no empty lists)", param="prompt")


def _usage(results: list[GenerationResult], *, n: int, score_only: bool = False) -> dict:
    """OpenAI's usage: each prompt counted once (its n samples share it), completion tokens summed."""
    prompt_tokens = sum(r.prompt_tokens for r in results[::n])
    completion = 0 if score_only else sum(r.completion_tokens for r in results)
    cached = sum(getattr(r, "cached_tokens", 0) for r in results[::n])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}


def _speculative_stats(results: list[GenerationResult]) -> dict[str, Any]:
    """Atelier's extra response field when speculative decoding ran: ``{"speculative": {"draft_tokens",
    "accepted_tokens", "target_passes"}}`` summed over the choices (clients see whether, and how well, the
    draft worked); {} for plain decoding."""
    ran = [r for r in results if r.target_passes]
    if not ran:
        return {}
    return {"speculative": {"draft_tokens": sum(r.draft_tokens for r in ran),
                            "accepted_tokens": sum(r.accepted_tokens for r in ran),
                            "target_passes": sum(r.target_passes for r in ran)}}


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



#: our GenerationResult.finish_reason -> the API's. OpenAI defines "stop" (EOS or a stop string) and "length"
#: (max_tokens or the context); it has no value for a reply cut short, so, as vLLM does, such a reply ends
#: with "abort" rather than passing for a finished one.
FINISH_REASONS = {"stop": "stop", "length": "length", "interrupted": "abort"}


def _finish(result: GenerationResult) -> str:
    return FINISH_REASONS[result.finish_reason]




class _Choice:
    """One choice of a response: its generation handle and how its text and logprobs are shown."""

    def __init__(self, index: int, handle: Any, get_result: Callable[[], GenerationResult], *, chat: bool,
                 tokenizer: Any, logprobs: bool, echo: str = "", echo_logprobs: bool = False,
                 score_only: bool = False):
        self.index, self.handle, self.get_result, self.chat = index, handle, get_result, chat
        self.tokenizer, self.logprobs, self.echo = tokenizer, logprobs, echo
        self.echo_logprobs, self.score_only = echo_logprobs, score_only
        self.stream_offsets = CompletionLogprobs(tokenizer, len(echo))  # text_offset while streaming
        self.result: GenerationResult | None = None  # set once streamed

    def _prompt_part(self, source: Any) -> dict[str, Any] | None:
        """The echoed prompt's legacy logprobs (from a result or the first stream delta)."""
        if not self.echo_logprobs or source.prompt_logprobs is None:
            return None
        return CompletionLogprobs(self.tokenizer).add(self.handle.request.prompt_ids, source.prompt_logprobs,
                                                      source.prompt_top_logprobs)

    def final_logprobs(self, result: GenerationResult) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        ids, lps, tops = result.token_ids, result.token_logprobs or [], result.top_logprobs or []
        if self.chat:
            return {"content": chat_entries(self.tokenizer, ids, lps, tops), "refusal": None}
        prompt = self._prompt_part(result)
        if self.score_only:
            return prompt
        offset = len(self.echo) if prompt is None else sum(len(t) for t in prompt["tokens"])
        return merge(prompt, CompletionLogprobs(self.tokenizer, offset).add(ids, lps, tops))


async def _wait_all(request: Request, choices: list[_Choice]) -> list[GenerationResult] | ApiError:
    """Wait for every choice's result, interrupting them all if the client disconnects meanwhile."""
    waiter = asyncio.ensure_future(run_in_threadpool(lambda: [c.get_result() for c in choices]))
    interrupted = False
    while True:
        done, _pending = await asyncio.wait({waiter}, timeout=0.25)
        if done:
            break
        if not interrupted and await request.is_disconnected():
            for choice in choices:
                choice.handle.interrupt()  # nobody will read the reply; each job ends at its next token
            interrupted = True
    try:
        return waiter.result()
    except Exception as exc:  # noqa: BLE001
        return _translate(exc)


def _sse(request: Request, choices: list[_Choice], base: dict[str, Any], *, n: int,
         include_usage: bool) -> StreamingResponse:
    """Stream the choices as SSE chunks, one after the other (they are generated together, so the later
    ones are already buffered); always ends with ``data: [DONE]``. Interrupts the jobs on disconnect."""

    def line(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def chunk(choice: _Choice, text: str | None, reason: str | None, logprobs: Any = None,
              role: bool = False) -> dict[str, Any]:
        if choice.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return {**base, "choices": [{"index": choice.index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": reason}]}
        return {**base, "choices": [{"index": choice.index, "text": text or "", "logprobs": logprobs,
                                     "finish_reason": reason}]}

    def delta_logprobs(choice: _Choice, deltas: list[Any]) -> Any:
        if not choice.logprobs or not deltas:
            return None
        ids = [d.token_id for d in deltas]
        lps = [d.logprob for d in deltas]
        tops = [d.top_logprobs or [] for d in deltas]
        if choice.chat:
            return {"content": chat_entries(choice.tokenizer, ids, lps, tops), "refusal": None}
        return choice.stream_offsets.add(ids, lps, tops)

    async def one(choice: _Choice) -> AsyncIterator[str]:
        if choice.chat:
            yield line(chunk(choice, None, None, role=True))
        # every delta already generated at once, and no thread hop: under load the event loop and the decode
        # thread share two cores (modules.jobs.Job.stream_batches_async says what a hop per batch cost)
        pending: list[Any] = []  # deltas whose text is held back (stop strings, split characters)
        first = True
        async for batch in choice.handle.event_batches_async():
            lines = []
            for delta in batch:
                if first and not choice.chat and choice.echo:
                    prompt = choice._prompt_part(delta)
                    if prompt is not None:
                        choice.stream_offsets.offset = sum(len(t) for t in prompt["tokens"])
                    lines.append(line(chunk(choice, choice.echo, None, prompt)))
                first = False
                if choice.score_only:
                    continue
                if delta.token_id >= 0 and delta.logprob is not None:
                    pending.append(delta)
                if delta.text:
                    lines.append(line(chunk(choice, delta.text, None, delta_logprobs(choice, pending))))
                    pending = []
            if lines:
                yield "".join(lines)
        result = await run_in_threadpool(choice.get_result)
        if first and choice.echo and not choice.chat:  # nothing streamed (stopped at once): echo still shown
            yield line(chunk(choice, choice.echo, None, choice._prompt_part(result)))
        yield line(chunk(choice, None if choice.chat else "", _finish(result), delta_logprobs(choice, pending)))
        choice.result = result

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            for choice in choices:
                async for text in one(choice):
                    yield text
            finished = True
            if include_usage:
                results = [c.result for c in choices]
                yield line({**base, "choices": [], "usage": _usage(results, n=n, score_only=choices[0].score_only),
                            **_speculative_stats(results)})
        except Exception as exc:  # noqa: BLE001 - the error goes to the client as a chunk, the server lives on
            finished = True
            yield line(_translate(exc).payload())
        finally:
            if not finished:  # client went away (the task was cancelled) before the reply ended
                for choice in choices:
                    choice.handle.interrupt()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
