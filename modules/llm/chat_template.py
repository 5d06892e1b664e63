"""Chat templates: a conversation (list of {"role", "content"}) rendered to prompt text, as transformers does.

Templates are Jinja, rendered the way ``transformers``' ``apply_chat_template`` renders them: a sandboxed
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``raise_exception``, ``tojson`` (non-ASCII
kept) and ``strftime_now`` helpers, and the variables ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``. A model's own template comes from
``tokenizer_config.json`` (or ``chat_template.jinja``); otherwise a builtin is used:

* ``tinyllama`` - TinyLlama-1.1B-Chat-v1.0's Zephyr template (``<|system|>``/``<|user|>``/``<|assistant|>``
  turns, each closed by ``</s>``), character for character;
* ``llama2`` - Llama-2-chat (``<s>[INST] <<SYS>>...<</SYS>> ... [/INST]``);
* ``chatml`` - ``<|im_start|>role ... <|im_end|>``.

BOS convention (one rule for every template): a template renders text only; :func:`prompt_ids`
tokenizes it with ``add_bos=True`` unless the rendered text already starts with the BOS token string.
So the TinyLlama and ChatML templates (which never write ``<s>``) get exactly one BOS from the
tokenizer, and Llama-2's template (which writes ``<s>`` itself) gets none added. Compared with
transformers' ``apply_chat_template(tokenize=True)``, which never adds special tokens, the ids equal
HF's with one BOS in front for templates that do not write it, and equal HF's exactly otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

TINYLLAMA = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# Llama-2-chat: the system prompt is folded into the first user turn; every user turn opens with
# BOS, every assistant turn closes with EOS; roles must alternate user/assistant.
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama-2 conversations must alternate user/assistant/user/... after an optional system message') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is not none %}"
    "{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'].strip() + ' [/INST]' }}"
    "{% else %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% endif %}"
    "{% else %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"tinyllama": TINYLLAMA, "llama2": LLAMA2, "chatml": CHATML}


class ChatTemplateError(ValueError):
    """A template that failed to render (including its own ``raise_exception`` calls)."""


class _TokenizerLike(Protocol):
    bos_id: int

    def encode(self, text: str, add_bos: bool) -> list[int]: ...


@dataclass
class ChatTemplate:
    source: str
    #: "tokenizer_config.json", "chat_template.jinja" or "builtin:<name>"
    origin: str = "custom"
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    unk_token: str = "<unk>"
    pad_token: str | None = None

    @classmethod
    def builtin(cls, name: str, **tokens: str) -> "ChatTemplate":
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(f"Unknown builtin chat template {name!r}; choose one of {sorted(BUILTIN_TEMPLATES)}")
        return cls(BUILTIN_TEMPLATES[name], origin=f"builtin:{name}", **tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for ``messages``; ``extra`` become template variables (as in transformers)."""
        import jinja2

        problems = [f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}"
                    for i, m in enumerate(messages) if not isinstance(m, dict) or "role" not in m]
        if problems:
            raise ChatTemplateError("; ".join(problems))
        variables = dict(bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
                         pad_token=self.pad_token, **extra)
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"Chat template ({self.origin}) failed: {exc}") from exc


def _raise_exception(message: str) -> None:
    import jinja2
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<' and '&'; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str):
    """Compile once per template text (the cache holds immutable compiled templates only)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"Chat template has a Jinja syntax error on line {exc.lineno}: {exc.message}") \
            from exc


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_chat_template(model_dir: str | Path, fallback: str = "tinyllama") -> ChatTemplate:
    """The model's own template (``tokenizer_config.json`` or ``chat_template.jinja``), else a builtin."""
    folder = Path(model_dir)
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
    source, origin = None, None
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path} is not valid JSON ({exc}); fix or delete it") from exc
        for key in tokens:
            text = _token_text(data.get(key))
            if text is not None:
                tokens[key] = text
        template = data.get("chat_template")
        if isinstance(template, list):   # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            source, origin = template, "tokenizer_config.json"
    jinja_path = folder / "chat_template.jinja"
    if source is None and jinja_path.is_file():
        source, origin = jinja_path.read_text(encoding="utf-8"), "chat_template.jinja"
    if source is None:
        return ChatTemplate.builtin(fallback, **tokens)
    return ChatTemplate(source, origin=origin, **tokens)


def prompt_ids(tokenizer: _TokenizerLike, template: ChatTemplate, rendered: str) -> list[int]:
    """Token ids for a rendered prompt under the module's BOS convention (exactly one BOS)."""
    return tokenizer.encode(rendered, add_bos=not rendered.startswith(template.bos_token))
