"""The LLM capability's service: models, prompts and generation, shared by the Chat tab and the API.

``ctx.llm`` is one :class:`LLMService`. It

* lists the model folders in ``models/LLM`` and loads / unloads them through the shared model manager
  (key ``llm:<name>``), always on the device worker (the job queue), like every other load; generation
  holds a lease for the whole batch, so a model in use is never evicted;
* reads each folder's tokenizer, template and config without its weights (:meth:`LLMService.files`), so
  prompts are tokenized and planned in the caller's thread and nothing there waits for, or does, device work;
* turns a chat (system prompt + turns) into prompt tokens with the model's chat template, dropping the
  oldest turns when the history does not fit the context (the system prompt is always kept) and saying
  so in the returned :class:`ChatRun`;
* queues requests on the shared job queue through one :class:`~modules.llm.engine.LLMEngine` per model;
* fires the ``on_chat_message`` extension callback for each user message and each finished reply.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from modules.llm.chat_history import ChatStore
from modules.llm.engine import (GenerationHandle, GenerationRequest, GenerationResult, LLMEngine, TokenDelta,
                                check_prompt_fits, context_length)
from modules.llm.sampling import SETTINGS_FIELDS, SamplingParams, setting_key

log = logging.getLogger(__name__)

#: the two backends a model can run on (see :meth:`LLMService.backend`)
ATELIER, LLAMA_CPP = "atelier", "llama.cpp"


class ModelNotFound(LookupError):
    """No usable model folder of that name in models/LLM."""


class ModelUnusable(ValueError):
    """The folder exists but cannot be loaded (broken config, missing tokenizer...)."""


@dataclass
class PromptPlan:
    """A rendered prompt and how it was fitted into the context."""
    ids: list[int]
    text: str
    messages: list[dict[str, Any]]  # the messages actually rendered
    dropped: int = 0  # how many of the oldest messages were left out to fit

    @property
    def notice(self) -> str:
        if not self.dropped:
            return ""
        return (f"The conversation is longer than the model's context: the {self.dropped} oldest message"
                f"{'s were' if self.dropped != 1 else ' was'} left out of the prompt (the system prompt is kept).")


@dataclass
class ReplyUpdate:
    messages: list[dict[str, Any]]
    notice: str = ""
    result: GenerationResult | None = None


@dataclass
class ChatRun:
    """One chat reply being generated: stream ``events()``, then read ``result()``."""
    handle: GenerationHandle
    plan: PromptPlan
    model: str
    chat_id: str | None
    service: "LLMService"
    _reported: bool = field(default=False, repr=False)

    @property
    def dropped(self) -> int:
        return self.plan.dropped

    @property
    def notice(self) -> str:
        return self.plan.notice

    def events(self) -> Iterator[TokenDelta]:
        yield from self.handle.events()
        self.result()

    def result(self, timeout: float | None = None) -> GenerationResult:
        result = self.handle.result(timeout)
        if not self._reported:
            self._reported = True
            self.service.fire_message("assistant", result.text, self.chat_id, self.model)
        return result

    def interrupt(self) -> None:
        self.handle.interrupt()

    @property
    def done(self) -> bool:
        return self.handle.done


class LLMService:
    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.chats = ChatStore(ctx.paths.chats_dir)
        self._lock = threading.Lock()
        self._current: str | None = None
        self._engines: dict[tuple[str, str], LLMEngine] = {}   # (model name, backend) -> engine
        self._extra_buffers: bool | None = None   # llama.cpp's extra buffer types work here (probed on first use)
        self._reported_broken: set[tuple[str, str]] = set()  # (folder, reason) already logged once
        #: LLMFiles per model name, with the signature of the files they were read from
        self._files: dict[str, tuple[Path, tuple, Any]] = {}   # name -> (path, files signature, LLMFiles)

    # -- models ------------------------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.ctx.paths.model_dir("LLM")

    def list_models(self) -> list[dict[str, Any]]:
        """Every folder in models/LLM: ``{"name", "path", "error"}`` (error None when it looks loadable).
        Each unusable folder is logged once with its reason."""
        from modules.llm.loader import list_llm_models
        models = list_llm_models(self.models_dir,
                                 allow_unsafe_pickle=bool(getattr(self.ctx.opts, "allow_unsafe_pickle", False)))
        for m in models:
            if m.get("error") and (m["name"], m["error"]) not in self._reported_broken:
                self._reported_broken.add((m["name"], m["error"]))
                log.warning("LLM folder %s is not usable: %s", m["name"], m["error"])
        return models

    def model_names(self) -> list[str]:
        """The usable models, in folder order: the first one is the default when none is chosen."""
        return [m["name"] for m in self.list_models() if not m.get("error")]

    def unusable_models(self) -> list[dict[str, Any]]:
        """The folders that cannot be loaded, with the reason: ``{"name", "path", "error"}``."""
        return [m for m in self.list_models() if m.get("error")]

    @staticmethod
    def model_key(name: str) -> str:
        return f"llm:{name}"

    def _entry(self, name: str) -> dict[str, Any]:
        for entry in self.list_models():
            if entry["name"] == name:
                if entry.get("error"):
                    raise ModelUnusable(f"model {name!r} cannot be loaded: {entry['error']}")
                return entry
        available = ", ".join(self.model_names()) or "none"
        raise ModelNotFound(f"no LLM model named {name!r} in {self.models_dir} (available: {available})")

    def files(self, name: str) -> Any:
        """The :class:`~modules.llm.loader.LLMFiles` of model *name* (config, tokenizer, template; no weights),
        read once and again only when those files change. Raises ModelNotFound / ModelUnusable."""
        from modules.llm.loader import read_llm_files
        with self._lock:
            cached = self._files.get(name)
        # A hit skips the folder scan of list_models (every folder's headers checked): every API request asks
        # for its model's files, and the scan cost more than a short reply's decode under load.
        if cached is not None and cached[0].exists() and _files_signature(cached[0]) == cached[1]:
            return cached[2]
        path = Path(self._entry(name)["path"])
        signature = _files_signature(path)
        try:
            files = read_llm_files(path)
        except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
            raise ModelUnusable(f"model {name!r} could not be loaded: {exc}") from exc
        with self._lock:
            self._files[name] = (path, signature, files)
        return files

    def acquire(self, name: str) -> Any:
        """A model-manager lease on model *name* (loaded on first use). Release it when done.

        The load, and the move back of a model parked by --medvram, run on the device worker: called from
        any other thread this queues that work and waits for it.
        """
        if not self.ctx.jobs.in_worker:
            return self.ctx.jobs.call(lambda job: self._lease(name), name=f"load {name}")
        return self._lease(name)

    def _lease(self, name: str) -> Any:
        """On the device worker: lease *name*, loading it (with room made first) when it is not in memory."""
        from modules.llm.cpu_threading import row_parallel_threads
        from modules.weight_bytes import estimate_load_bytes
        key = self.model_key(name)
        backend = self.backend(name)
        if self.ctx.models.is_loaded(key):
            try:  # already in memory: no need to scan the folder again
                lease = self.ctx.models.acquire(key, kind="llm")
            except KeyError:
                pass  # evicted in between; load it below
            else:
                if getattr(lease.model, "backend", "atelier") == backend:
                    return lease
                lease.release()  # loaded on the other GGUF backend before the setting changed: reload
                self.ctx.models.unload(key)
        files = self.files(name)
        path = Path(files.path)
        devices = self.ctx.devices
        threads = row_parallel_threads(bool(self.ctx.settings.get("llm.cpu_row_parallel")), devices.cpu_threads)
        weight_quant = self.ctx.settings.get("llm.weight_quantization") or "none"

        if backend == LLAMA_CPP:
            def load_gguf() -> Any:
                from modules.llm.llamacpp_backend import load_llamacpp
                try:
                    return load_llamacpp(path, files, threads=devices.cpu_threads or os.cpu_count() or 1,
                                         extra_buffers=self.llama_cpp_extra_buffers())
                except ValueError as exc:
                    raise ModelUnusable(f"model {name!r} could not be loaded: {exc}") from exc

            return self.ctx.models.acquire(key, load_gguf, kind="llm", size_bytes=path.stat().st_size,
                                           meta={"name": name, "path": str(path), "backend": backend})

        dtype = devices.llm_dtype(files.config)   # --precision auto: bf16 for wide models on a bf16 CPU

        def load() -> Any:
            from modules.llm.loader import load_llm
            try:
                return load_llm(path, devices.device, dtype, files=files, row_parallel_threads=threads,
                                allow_unsafe_pickle=bool(getattr(self.ctx.opts, "allow_unsafe_pickle", False)),
                                attention=devices.attention, weight_quant=weight_quant)
            except (ValueError, OSError, KeyError) as exc:
                raise ModelUnusable(f"model {name!r} could not be loaded: {exc}") from exc

        return self.ctx.models.acquire(key, load, kind="llm", size_bytes=estimate_load_bytes(path, dtype),
                                       meta={"name": name, "path": str(path)})

    def load(self, name: str) -> dict[str, Any]:
        """Load model *name* (if needed, on the device worker) and make it the current model; returns a
        description of it."""
        def work(job: Any) -> dict[str, Any]:
            lease = self._lease(name)
            try:
                return describe(lease.model)
            finally:
                lease.release()

        info = self.ctx.jobs.call(work, name=f"load {name}")
        with self._lock:
            self._current = name
        return info

    def unload(self, name: str | None = None) -> bool:
        """Unload *name* (default: the current model). Raises ModelInUse while it is generating."""
        name = name or self._current
        if not name:
            return False
        done = self.ctx.models.unload(self.model_key(name))
        with self._lock:
            if self._current == name:
                self._current = None
        return done

    @property
    def current_model(self) -> str | None:
        """The model last loaded here, while it is still in memory."""
        name = self._current
        return name if name and self.ctx.models.is_loaded(self.model_key(name)) else None

    def resolve_model(self, name: str | None = None) -> str:
        """The model a request means: the one named, else the current one, else the default setting, else the
        only/first available one. Raises ModelNotFound when there is none."""
        if name:
            if not self.ctx.models.is_loaded(self.model_key(name)):
                self._entry(name)  # raises ModelNotFound / ModelUnusable
            return name
        for candidate in (self.current_model, self.ctx.settings.get("llm.default_model")):
            if candidate and candidate in self.model_names():
                return candidate
        names = self.model_names()
        if not names:
            raise ModelNotFound(f"no LLM models found in {self.models_dir}: put a Hugging Face model folder there "
                                "(config.json, *.safetensors, tokenizer.model)")
        return names[0]

    def backend(self, name: str) -> str:
        """What runs model *name*: "llama.cpp" for a GGUF file while the ``llm.gguf_backend`` setting says so
        (and llama-cpp-python loads), else "atelier" (Atelier's own engine)."""
        if not name.lower().endswith(".gguf"):
            return ATELIER
        if self.ctx.settings.get("llm.gguf_backend") != LLAMA_CPP:
            return ATELIER
        from modules.llm.llamacpp_runtime import llama_cpp_module
        llama_cpp_module()  # raises LlamaCppUnavailable with what to do
        return LLAMA_CPP

    def llama_cpp_extra_buffers(self) -> bool:
        """Whether llama.cpp may use its AMX / repacked weight buffers here: probed once, on the first GGUF
        load (:func:`~modules.llm.llamacpp_runtime.extra_buffers_work`)."""
        with self._lock:
            if self._extra_buffers is None:
                from modules.llm.llamacpp_runtime import extra_buffers_work
                self._extra_buffers = extra_buffers_work()
            return self._extra_buffers

    def engine(self, name: str) -> LLMEngine:
        """The engine for model *name* on its current backend (one per model and backend)."""
        backend = self.backend(name)
        with self._lock:
            engine = self._engines.get((name, backend))
            if engine is None:
                if backend == LLAMA_CPP:
                    from modules.llm.llamacpp_backend import LlamaCppEngine
                    engine = LlamaCppEngine(self.ctx.jobs, name, lambda: self.acquire(name))
                else:
                    engine = LLMEngine(self.ctx.jobs, name, lambda: self.acquire(name), kv_pool=self._kv_pool,
                                       options=self._engine_options, draft=lambda: self.draft_for(name))
                self._engines[(name, backend)] = engine
            return engine

    def _engine_options(self) -> dict[str, Any]:
        settings = self.ctx.settings
        return {"max_batch": int(settings.get("llm.max_batch")), "prefix_caching": bool(settings.get("llm.prefix_caching")),
                "paged": settings.get("llm.engine") != "contiguous"}

    def _kv_pool(self, lease: Any) -> Any:
        """The leased model's KV block pool: sized by ``llm.kv_cache_mb`` when first needed, owned by the model
        manager's entry (counted against its budget, freed with the model)."""
        from modules.llm.paged.block_pool import BlockPool
        from modules.llm.paged.kv_memory import new_pool, pool_blocks
        llm = lease.model
        blocks = pool_blocks(llm, kv_cache_mb=int(self.ctx.settings.get("llm.kv_cache_mb")),
                             max_batch=int(self.ctx.settings.get("llm.max_batch")),
                             free_bytes=max(0, self.ctx.models.budget_free()))
        config = llm.config
        size = BlockPool.bytes_for(blocks, layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads,
                                   head_dim=config.head_dim, dtype=llm.dtype)
        return self.ctx.models.attach(lease.key, "kv_pool", size, lambda: new_pool(llm, blocks))

    # -- speculative decoding -------------------------------------------------------------------------------
    def draft_for(self, name: str) -> Any:
        """The :class:`~modules.llm.speculative.DraftSetup` of target *name* from the ``llm.draft_models``
        setting, or None when it has no draft. Raises SpeculativeUnavailable / DraftIncompatible, saying
        which setting to change, when the draft set cannot draft for it (checked on the files: no weights)."""
        from modules.llm.draft_settings import DRAFT_MODELS_KEY, SPECULATIVE_K_KEY, parse_draft_models
        from modules.llm.speculative import DraftSetup
        draft = parse_draft_models(self.ctx.settings.get(DRAFT_MODELS_KEY)).get(name)
        if not draft:
            return None
        self.check_draft(name, draft)
        return DraftSetup(draft, lambda: self.acquire(draft), int(self.ctx.settings.get(SPECULATIVE_K_KEY)))

    def check_draft(self, target: str, draft: str) -> None:
        """Raise (with the reason and what to do) unless *draft* can draft for *target*."""
        from modules.llm.draft_settings import DRAFT_MODELS_KEY
        from modules.llm.speculative import SpeculativeUnavailable, check_draft_compatible
        fix = f"choose another draft for {target!r} in the {DRAFT_MODELS_KEY} setting (the Chat tab's draft dropdown)"
        for role, name in (("target", target), ("draft", draft)):
            try:
                backend = self.backend(name)
            except ValueError as exc:
                raise SpeculativeUnavailable(f"speculative decoding: the {role} {name!r} cannot run: {exc}") from None
            if backend != ATELIER:
                raise SpeculativeUnavailable(
                    f"speculative decoding needs Atelier's own engine, but the {role} {name!r} runs on {backend} "
                    "(set llm.gguf_backend to atelier, or leave speculative decoding off for this model)")
        try:
            target_files, draft_files = self.files(target), self.files(draft)
        except (ModelNotFound, ModelUnusable) as exc:
            raise SpeculativeUnavailable(f"the draft model set for {target!r} is not usable ({exc}); {fix}") from None
        from modules.llm.speculative import DraftIncompatible
        try:
            check_draft_compatible(target_files, draft_files, target_name=target, draft_name=draft)
        except DraftIncompatible as exc:
            raise DraftIncompatible(f"{exc} ({fix})") from None

    def set_draft(self, target: str, draft: str | None) -> None:
        """Turn speculative decoding on for *target* with *draft* (None / "": off) and save the settings;
        raises (nothing changed) when *draft* cannot draft for *target*."""
        from modules.llm.draft_settings import DRAFT_MODELS_KEY, with_draft
        if draft:
            self.check_draft(target, draft)
        self.ctx.settings.set(DRAFT_MODELS_KEY, with_draft(self.ctx.settings.get(DRAFT_MODELS_KEY), target, draft))
        self.ctx.settings.save()

    def draft_of(self, target: str | None) -> str | None:
        """The draft set for *target* in the settings (not checked), or None."""
        from modules.llm.draft_settings import DRAFT_MODELS_KEY, parse_draft_models
        return parse_draft_models(self.ctx.settings.get(DRAFT_MODELS_KEY)).get(target or "") or None

    # -- sampling defaults ---------------------------------------------------------------------------------
    def default_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams from the llm.* settings, with *overrides* (None values ignored) applied."""
        values = {name: self.ctx.settings.get(setting_key(name)) for name in SETTINGS_FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams.from_dict(values)

    # -- prompts -------------------------------------------------------------------------------------------
    def plan_chat_prompt(self, llm: Any, messages: list[dict[str, Any]], *, system_prompt: str | None = None,
                         max_new_tokens: int = 256, continue_last: bool = False) -> PromptPlan:
        """Render *messages* with the model's chat template into prompt ids that fit the context.

        The reply needs room too: the prompt may use the context minus ``max_new_tokens``, but at most half
        the context is reserved, so a large max_new_tokens does not wipe the history. Oldest turns go
        first; the system prompt and the last message are always kept (if even those do not fit,
        PromptTooLong). With *continue_last*, the last message is an assistant reply to be continued.
        """
        messages = [dict(m) for m in messages]
        system = [m for m in messages if m.get("role") == "system"]
        turns = [m for m in messages if m.get("role") != "system"]
        if system_prompt:
            system = [{"role": "system", "content": system_prompt}]
        if not turns:
            raise ValueError("there is no message to reply to: add a user message")
        ctx_len = context_length(llm)
        budget = ctx_len - min(max(1, int(max_new_tokens)), ctx_len // 2)
        dropped = 0
        while True:
            text, ids = render_prompt(llm, system + turns, continue_last=continue_last)
            if len(ids) <= budget or len(turns) <= 1:
                break
            # drop the oldest turn: a user message and the replies that follow it
            cut = 1
            while cut < len(turns) - 1 and turns[cut].get("role") == "assistant":
                cut += 1
            turns, dropped = turns[cut:], dropped + cut
        check_prompt_fits(len(ids), ctx_len, what="the prompt (with only the system prompt and the last message)",
                          fix="shorten the message or the system prompt")
        return PromptPlan(ids=ids, text=text, messages=system + turns, dropped=dropped)

    # -- generation ------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *,
             model: str | None = None, system_prompt: str | None = None, chat_id: str | None = None,
             continue_last: bool = False, fire_user: bool = True, owner: str | None = None,
             logprobs: int | None = None, speculative: bool | None = None) -> ChatRun:
        """Queue a reply to *messages* (OpenAI-style dicts); returns at once with a :class:`ChatRun`.

        *continue_last*: the last message is an assistant reply to extend. *fire_user*: report the last user
        message to ``on_chat_message`` (False when regenerating a reply to a message already reported).
        *owner*: who asked (see :mod:`modules.job_owner`); only the returned run's ``interrupt`` stops it.
        *logprobs*: record each generated token's logprob and this many alternatives (None: off).
        *speculative*: None as the ``llm.draft_models`` setting says, True required, False off.
        """
        params = (params or self.default_params()).validate()
        check_messages(messages)
        name = self.resolve_model(model)
        self._check_speculative_backend(name, speculative)
        plan = self.plan_chat_prompt(self.files(name), messages, system_prompt=system_prompt,
                                     max_new_tokens=params.max_new_tokens, continue_last=continue_last)
        if fire_user and messages[-1].get("role") == "user" and not continue_last:
            self.fire_message("user", messages[-1]["content"], chat_id, name)
        request = GenerationRequest(plan.ids, params, label=f"chat {chat_id or ''}".strip(),
                                    keep_leading_space=continue_last, logprobs=logprobs, speculative=speculative)
        return ChatRun(self.engine(name).submit(request, owner=owner), plan, name, chat_id, self)

    def stream_reply(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *,
                     model: str | None = None, system_prompt: str | None = None, chat_id: str | None = None,
                     continue_last: bool = False, fire_user: bool = True, owner: str | None = None,
                     on_start: Callable[[ChatRun], None] | None = None,
                     speculative: bool | None = None) -> Iterator["ReplyUpdate"]:
        """Generate a reply and yield the conversation as it grows (what the Chat tab shows).

        Every update carries the whole message list with the reply so far as its last message; the last
        update has ``result`` set and the reply's ``meta`` (tokens, tokens/s, finish reason, seed).
        *on_start* receives the :class:`ChatRun` first, so a Stop button can interrupt it.
        """
        run = self.chat(messages, params, model=model, system_prompt=system_prompt, chat_id=chat_id,
                        continue_last=continue_last, fire_user=fire_user, owner=owner, speculative=speculative)
        if on_start is not None:
            on_start(run)
        base = [dict(m) for m in messages]
        prefix = base.pop().get("content", "") if continue_last else ""
        text = ""
        try:
            for delta in run.handle.events():
                if delta.text:
                    text += delta.text
                    yield ReplyUpdate(base + [{"role": "assistant", "content": prefix + text}], run.notice)
        finally:
            if not run.done:  # the consumer went away (browser tab closed): stop generating for nobody
                run.interrupt()
        result = run.result()
        meta = {"tokens": result.completion_tokens, "prompt_tokens": result.prompt_tokens,
                "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_second, 2),
                "finish_reason": result.finish_reason, "seed": result.seed, "model": run.model,
                **speculative_meta(result)}
        final = {"role": "assistant", "content": prefix + result.text, "meta": meta}
        yield ReplyUpdate(base + [final], run.notice, result)

    def complete(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                 model: str | None = None, add_bos: bool = True, owner: str | None = None,
                 logprobs: int | None = None, prompt_logprobs: bool = False,
                 speculative: bool | None = None) -> tuple[GenerationHandle, str]:
        """Queue a plain completion of *prompt* (text, or token ids); returns (handle, model name).

        *logprobs*: record generated tokens' logprobs with this many alternatives; *prompt_logprobs*: the
        prompt's too (echo)."""
        params = (params or self.default_params()).validate()
        name = self.resolve_model(model)
        self._check_speculative_backend(name, speculative)
        llm = self.files(name)
        ids = list(prompt) if isinstance(prompt, list) else llm.tokenizer.encode(prompt, add_bos=add_bos)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < llm.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {llm.config.vocab_size}), got {bad[:5]}")
        check_prompt_fits(len(ids), context_length(llm))
        request = GenerationRequest(ids, params, label="completion", logprobs=logprobs,
                                    prompt_logprobs=prompt_logprobs, speculative=speculative)
        return self.engine(name).submit(request, owner=owner), name

    def _check_speculative_backend(self, name: str, speculative: bool | None) -> None:
        """A request that requires speculative decoding of a model llama.cpp serves is refused (llama.cpp's
        engine has no draft path); with speculative None such a model simply decodes plainly."""
        if speculative and self.backend(name) != ATELIER:
            from modules.llm.speculative import SpeculativeUnavailable
            raise SpeculativeUnavailable(f"speculative decoding needs Atelier's own engine, but {name!r} runs on "
                                         f"{self.backend(name)}: set llm.gguf_backend to atelier, or leave "
                                         "speculative out")

    def count_tokens(self, text: str, model: str | None = None) -> int:
        return len(self.files(self.resolve_model(model)).tokenizer.encode(text, add_bos=False))

    def fire_message(self, role: str, content: str, chat_id: str | None, model: str | None) -> None:
        self.ctx.callbacks.fire("on_chat_message", role=role, content=content, chat_id=chat_id, model=model,
                                ctx=self.ctx)


# -- helpers ------------------------------------------------------------------------------------------------

def speculative_meta(result: GenerationResult) -> dict[str, Any]:
    """A reply's speculative-decoding figures for the Chat tab's stats line ({} for plain decoding):
    the share of drafted tokens the target accepted, and tokens per target forward pass (the speed-up over
    plain decoding's one token per pass, before the draft's own cost: what drafting bought in passes)."""
    if not result.target_passes:
        return {}
    return {"draft_tokens": result.draft_tokens, "accepted_tokens": result.accepted_tokens,
            "target_passes": result.target_passes,
            "acceptance": round(result.acceptance_rate, 3) if result.acceptance_rate is not None else None,
            "tokens_per_pass": round(result.completion_tokens / result.target_passes, 2)}


def check_messages(messages: Any) -> None:
    """Raise ValueError naming each malformed message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    problems = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(f"messages[{i}] must be an object, got {type(m).__name__}")
        elif m.get("role") not in ("system", "user", "assistant"):
            problems.append(f"messages[{i}].role is {m.get('role')!r}; use 'system', 'user' or 'assistant'")
        elif not isinstance(m.get("content"), str):
            problems.append(f"messages[{i}].content must be text, got {type(m.get('content')).__name__}")
    if problems:
        raise ValueError("; ".join(problems))


def render_prompt(llm: Any, messages: list[dict[str, Any]], *, continue_last: bool = False) -> tuple[str, list[int]]:
    """Prompt text and ids for *messages* with the model's chat template.

    Normal turn: render with the generation prompt (``<|assistant|>\\n`` for TinyLlama). Continue: render the
    partial assistant message as the last turn and cut the text right after its content, so the model picks
    up mid-reply (the template's end-of-turn marker is not in the prompt).
    """
    template = llm.template
    if continue_last and messages and messages[-1].get("role") == "assistant" and messages[-1].get("content"):
        text = template.render(messages, add_generation_prompt=False)
        content = messages[-1]["content"]
        end = text.rfind(content)
        if end < 0:
            raise ValueError("cannot continue: the chat template does not reproduce the last reply verbatim")
        text = text[:end + len(content)]
    else:
        if continue_last and messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # an empty reply to continue is a fresh reply
        text = template.render(messages, add_generation_prompt=True)
    from modules.llm.chat_template import prompt_ids
    return text, prompt_ids(llm.tokenizer, template, text)


def describe(llm: Any) -> dict[str, Any]:
    cfg = llm.config
    return {"name": llm.name, "path": str(llm.path), "context_length": int(cfg.max_position_embeddings),
            "vocab_size": int(cfg.vocab_size), "layers": int(cfg.num_hidden_layers),
            "heads": int(cfg.num_attention_heads), "kv_heads": int(cfg.num_key_value_heads),
            "memory_mb": round(llm.memory_bytes() / 2**20, 1), "backend": getattr(llm, "backend", ATELIER)}


def _files_signature(folder: Path) -> tuple:
    """(name, size, mtime) of the files :func:`~modules.llm.loader.read_llm_files` reads: changes when they do.
    A ``.gguf`` model is one file, which holds its config and tokenizer."""
    if folder.is_file():
        st = folder.stat()
        return ((folder.name, st.st_size, st.st_mtime_ns),)
    out = []
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "chat_template.jinja"):
        try:
            st = (folder / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None, None))
    return tuple(out)
