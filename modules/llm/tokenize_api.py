"""vLLM's root-level tokenizer routes: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

lm-evaluation-harness (``tokenizer_backend="auto"``/``"remote"``), vLLM's benchmark scripts and other
clients use them to count and split tokens exactly as the server does, without a local copy of the
tokenizer. Wire format as vLLM's (``vllm/entrypoints/serve/tokenize``):

* ``/tokenize`` ``{model?, prompt, add_special_tokens=true, return_token_strs=false}`` or
  ``{model?, messages, add_generation_prompt=true, continue_final_message=false, return_token_strs}``
  -> ``{count, max_model_len, tokens, token_strs}``. For *messages* the ids are exactly the prompt
  ``/v1/chat/completions`` feeds the model (its chat template, one BOS), so ``count`` equals its
  ``usage.prompt_tokens``;
* ``/detokenize`` ``{model?, tokens}`` -> ``{prompt}`` (special tokens written out, as vLLM does);
* ``/tokenizer_info`` (``?model=`` optional) -> the tokenizer's config (``tokenizer_config.json``) with
  the special tokens, the chat template and ``model_max_length`` resolved as the server uses them.

``model`` may be left out (vLLM serves one model): the server's default model is meant, as in
:meth:`~modules.llm.service.LLMService.resolve_model`. They are mounted with the other API routes (``--api``),
behind the same ``--api-auth`` login. Errors are OpenAI-shaped like ``/v1``'s: 400 for bad input, 404 for
an unknown model.
"""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from modules.llm.openai_api import ApiError, _Message, _parse, _translate


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[_Message] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]


def tokenize(files: Any, body: TokenizeBody) -> list[int]:
    """The ids for a /tokenize body under model *files* (LLMFiles); ApiError for what cannot be tokenized."""
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give either \"prompt\" (text) or \"messages\" (a chat), not both or neither",
                       param="prompt")
    if body.prompt is not None:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        return files.tokenizer.encode(body.prompt, add_bos=add)
    if body.add_special_tokens:
        raise ApiError(400, "add_special_tokens: true does not apply to messages: the chat template already places "
                            "the BOS token (leave it out or false)", param="add_special_tokens")
    from modules.llm.chat_template import ChatTemplateError, prompt_ids
    from modules.llm.service import check_messages, render_prompt
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        check_messages(messages)
        if body.continue_final_message:
            if messages[-1]["role"] != "assistant":
                raise ApiError(400, "continue_final_message needs the last message to be the assistant's",
                               param="continue_final_message")
            return render_prompt(files, messages, continue_last=True)[1]
        text = files.template.render(messages, add_generation_prompt=body.add_generation_prompt)
        return prompt_ids(files.tokenizer, files.template, text)
    except (ValueError, ChatTemplateError) as exc:
        if isinstance(exc, ApiError):
            raise
        raise ApiError(400, str(exc), param="messages") from None


def detokenize(files: Any, tokens: list[int]) -> str:
    vocab = int(files.config.vocab_size)
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"tokens must be ids in [0, {vocab}), got {bad[:5]}", param="tokens")
    return files.tokenizer.decode(tokens, skip_special_tokens=False)


def tokenizer_info(files: Any) -> dict[str, Any]:
    """tokenizer_config.json as vLLM returns it, with what the server actually uses filled in."""
    from pathlib import Path
    from modules.llm.engine import context_length
    info: dict[str, Any] = {}
    config_file = Path(files.path) / "tokenizer_config.json"
    if config_file.is_file():
        try:
            info = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            info = {}
    info.pop("added_tokens_decoder", None)  # ids -> token objects; the tokens below are what clients read
    tok, template = files.tokenizer, files.template
    info.update({"tokenizer_class": info.get("tokenizer_class") or "LlamaTokenizer",
                 "bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token,
                 "pad_token": info.get("pad_token") if isinstance(info.get("pad_token"), str) else template.pad_token,
                 "add_bos_token": tok.add_bos_token, "chat_template": template.source,
                 "model_max_length": context_length(files), "vocab_size": int(files.config.vocab_size)})
    return info


def build_router(ctx: Any) -> APIRouter:
    router = APIRouter(tags=["tokenizer"])

    def files_for(model: str | None) -> Any:
        name = ctx.llm.resolve_model(model or None)
        return ctx.llm.files(name)

    @router.post("/tokenize")
    async def tokenize_route(request: Request) -> JSONResponse:
        """Token ids of a prompt or a chat, as the server would feed them to the model."""
        from modules.llm.engine import context_length
        try:
            body: TokenizeBody = await _parse(request, TokenizeBody)
            files = await run_in_threadpool(files_for, body.model)
            ids = await run_in_threadpool(tokenize, files, body)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            return _translate(exc).response()
        strs = [files.tokenizer.id_to_token(i) for i in ids] if body.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": context_length(files), "tokens": ids,
                             "token_strs": strs})

    @router.post("/detokenize")
    async def detokenize_route(request: Request) -> JSONResponse:
        """Text of token ids."""
        try:
            body: DetokenizeBody = await _parse(request, DetokenizeBody)
            files = await run_in_threadpool(files_for, body.model)
            return JSONResponse({"prompt": detokenize(files, body.tokens)})
        except Exception as exc:  # noqa: BLE001
            return _translate(exc).response()

    @router.get("/tokenizer_info")
    async def tokenizer_info_route(model: str | None = None) -> JSONResponse:
        """The tokenizer's configuration, special tokens and chat template."""
        try:
            files = await run_in_threadpool(files_for, model)
            return JSONResponse(tokenizer_info(files))
        except Exception as exc:  # noqa: BLE001
            return _translate(exc).response()

    return router
