"""Registers the LLM capability: its settings, ``ctx.llm``, the Chat tab, the ``/v1`` and tokenizer routes.

Cheap on purpose (start-up stays fast): nothing here loads a model or imports transformers or Gradio;
the Chat tab's module is imported only when the UI is built, models load on first use.
"""
from __future__ import annotations

from typing import Any

from modules.llm.cpu_threading import ROW_PARALLEL_DEFAULT
from modules.llm.draft_settings import (DEFAULT_MAX_K, DRAFT_MODELS_KEY, MAX_K_LIMIT, SPECULATIVE_K_KEY,
                                        check_draft_models)
from modules.quantize.torch_weights import WEIGHT_QUANT_CHOICES
from modules.settings import SettingSpec, SettingsSection
from modules.tabs import TabSpec, lazy_build

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def settings_section() -> SettingsSection:
    return SettingsSection("llm", "Chat / LLM", [
        SettingSpec("llm.default_model", "", "Default LLM (folder name in models/LLM; empty = first found)", str),
        SettingSpec("llm.cpu_row_parallel", ROW_PARALLEL_DEFAULT,
                    "CPU decode: split matrix products over threads by rows (models loaded afterwards; off by "
                    "measurement on an idle machine, see docs/performance.md)", bool),
        SettingSpec("llm.gguf_backend", "llama.cpp",
                    "GGUF models run on: llama.cpp (its quantized kernels, the file as it is) or atelier (Atelier's own "
                    "engine, weights dequantized; what speculative decoding, LoRA and training need)", str,
                    choices=("llama.cpp", "atelier")),
        SettingSpec("llm.weight_quantization", "none",
                    "Weight quantization of Atelier's own engine at load time (models loaded afterwards): int8 per "
                    "channel, or int4 in groups of 32/64/128 weights (CPU only); smaller and faster to decode, "
                    "slightly less accurate (benchmarks/quantize_torch.py measures both)", str,
                    choices=WEIGHT_QUANT_CHOICES),
        SettingSpec("llm.engine", "paged",
                    "Atelier's own engine: paged (KV cache in blocks, prefix caching, docs/serving.md) or contiguous "
                    "(the earlier batch loop, kept for comparisons such as benchmarks/serving.py)", str,
                    choices=("paged", "contiguous")),
        SettingSpec("llm.max_batch", 16, "Most replies one model decodes together (continuous batching)", int,
                    minimum=1, maximum=256),
        SettingSpec("llm.kv_cache_mb", 0,
                    "KV cache pool per model in MB (models loaded afterwards); 0 = automatic: a quarter of the free "
                    "memory budget, at most what llm.max_batch full-context replies need (docs/serving.md)", int,
                    minimum=0, maximum=1048576),
        SettingSpec("llm.prefix_caching", True,
                    "Prefix caching: reuse the KV cache of repeated prompt beginnings (system prompt, chat history, "
                    "n samples)", bool),
        # a list: the Settings tab leaves it out, the Chat tab's "Speculative decoding" dropdown edits the entry
        # of the model it shows (docs/speculative.md)
        SettingSpec(DRAFT_MODELS_KEY, [], "Speculative decoding: the draft model of each target model, as "
                    "\"target=draft\" entries (folder names in models/LLM; the draft needs the target's tokenizer)",
                    list, check=check_draft_models),
        SettingSpec(SPECULATIVE_K_KEY, DEFAULT_MAX_K, "Speculative decoding: most tokens the draft proposes per "
                    "round (k adapts below this to the measured acceptance)", int, minimum=1, maximum=MAX_K_LIMIT),
        SettingSpec("llm.api_max_n", 16, "API: most choices (n) one request may ask for", int, minimum=1,
                    maximum=128),
        SettingSpec("llm.api_max_logprobs", 20, "API: most top log-probabilities (top_logprobs / logprobs) per token",
                    int, minimum=0, maximum=1000),
        SettingSpec("llm.system_prompt", DEFAULT_SYSTEM_PROMPT, "Default system prompt", str),
        # ranges are what SamplingParams.validate and the OpenAI API accept; the Chat sliders are built from them
        SettingSpec("llm.max_new_tokens", 512, "Max new tokens per reply", int, minimum=1, maximum=32768, step=1),
        SettingSpec("llm.temperature", 0.7, "Temperature (0 = greedy)", float, minimum=0, maximum=2, step=0.01),
        SettingSpec("llm.top_k", 40, "Top-k (0 = off)", int, minimum=0, maximum=1000, step=1),
        SettingSpec("llm.top_p", 0.95, "Top-p (1 = off)", float, minimum=0.01, maximum=1, step=0.01),
        SettingSpec("llm.min_p", 0.05, "Min-p (0 = off)", float, minimum=0, maximum=1, step=0.01),
        SettingSpec("llm.repetition_penalty", 1.1, "Repetition penalty (1 = off, below 1 favours repeats)", float,
                    minimum=0.01, maximum=10, step=0.01),
        SettingSpec("llm.presence_penalty", 0.0, "Presence penalty", float, minimum=-2, maximum=2, step=0.05),
        SettingSpec("llm.frequency_penalty", 0.0, "Frequency penalty", float, minimum=-2, maximum=2, step=0.05),
    ])


def register(ctx: Any) -> None:
    from modules.llm.openai_api import build_router
    from modules.llm.service import LLMService
    from modules.llm.tokenize_api import build_router as build_tokenize_router

    ctx.settings.add_section(settings_section())
    ctx.llm = LLMService(ctx)
    ctx.tabs.add(TabSpec("chat", "Chat", lazy_build("modules.ui.tabs.chat"), order=10))
    ctx.api.include(build_router(ctx))
    ctx.api.include(build_tokenize_router(ctx))  # vLLM's /tokenize, /detokenize, /tokenizer_info
