"""Which llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) a GPT-2-style BPE ``tokenizer.json`` needs.

Before BPE merges run, text is split into words by a pre-tokenizer (a regex, sometimes a digit splitter
first). llama.cpp does not read that from the file: it implements a fixed set of them and a GGUF names
one in ``tokenizer.ggml.pre``. A wrong name tokenizes silently differently, so this module only answers
for structures it recognises exactly, and raises :class:`GGUFExportError` naming what it found otherwise.

llama.cpp's own converter identifies the pre-tokenizer by hashing the token ids of a probe text, which
only works for the published vocabularies it has hashes for; here the ``tokenizer.json``
``pre_tokenizer`` (and ``normalizer``) structure is compared instead, which also covers tokenizers
trained here. Each entry was checked against llama.cpp itself (``tests/quantize/test_gguf_export.py``
tokenizes probe texts with both): identical ids.
"""
from __future__ import annotations

from typing import Any

from modules.quantize.errors import GGUFExportError

#: Llama 3's split regex (Meta's tokenizer.json): digits in groups of up to three.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Qwen2's split regex: the same with single digits.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

#: llama.cpp pre-tokenizer names this module can choose, with the structure each stands for.
SUPPORTED = {
    "gpt-2": "ByteLevel(use_regex=true) alone: GPT-2's own regex",
    "smollm": "Digits(individual_digits=true), then ByteLevel(use_regex=true) (SmolLM, StarCoder)",
    "llama-bpe": "Split(Llama-3 regex, Isolated), then ByteLevel(use_regex=false) (Llama 3)",
    "qwen2": "NFC normalizer, Split(Qwen2 regex, Isolated), then ByteLevel(use_regex=false) (Qwen2)",
}


def detect_pre(tokenizer_json: dict[str, Any], source: str = "tokenizer.json") -> str:
    """The ``tokenizer.ggml.pre`` name for this byte-level BPE tokenizer; GGUFExportError if not recognised."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    normalizer = tokenizer_json.get("normalizer")
    kinds = [step.get("type") for step in steps]
    if normalizer is None:
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
                and steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space"):
            return "smollm"
        if _split_then_bytes(steps, LLAMA3_REGEX):
            return "llama-bpe"
    if isinstance(normalizer, dict) and normalizer.get("type") == "NFC" and _split_then_bytes(steps, QWEN2_REGEX):
        return "qwen2"
    found = " -> ".join(_describe(s) for s in steps) or "none"
    norm = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
    raise GGUFExportError(
        f"{source}: llama.cpp has no pre-tokenizer known to match this one (normalizer: {norm}; pre-tokenizer: "
        f"{found}), so its GGUF would tokenize text differently. Supported: "
        + "; ".join(f"{name} = {what}" for name, what in SUPPORTED.items())
        + ". Export a model with one of these tokenizers, or a SentencePiece tokenizer.model.")


def _steps(pre: Any) -> list[dict[str, Any]]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [p for p in pre.get("pretokenizers") or [] if isinstance(p, dict)]
    return [pre]


def _split_then_bytes(steps: list[dict[str, Any]], regex: str) -> bool:
    if [s.get("type") for s in steps] != ["Split", "ByteLevel"]:
        return False
    split, byte_level = steps
    pattern = split.get("pattern") or {}
    return (pattern.get("Regex") == regex and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("use_regex") is False and not byte_level.get("add_prefix_space"))


def _describe(step: dict[str, Any]) -> str:
    options = {k: v for k, v in step.items() if k not in ("type", "trim_offsets")}
    return f"{step.get('type')}({', '.join(f'{k}={v!r}' for k, v in options.items())})"
