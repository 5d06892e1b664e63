"""The ``prepare-data`` YAML config: read, apply ``key=value`` overrides, validate strictly.

Strict means: an unknown key is named (with the keys allowed there), a wrong type names the key, the value
and the type wanted, and every problem in the file is reported at once. Example::

    name: example                  # -> <data-dir>/training/data/example/
    seq_len: 256
    val_fraction: 0.01
    seed: 0
    tokenizer: {vocab_size: 4096}  # train a new one; or {from: models/LLM/some-model} to reuse a model's
    sources:
      - {name: text, paths: ["docs/*.md"], weight: 0.7}
      - {name: code, paths: ["modules/**/*.py"], weight: 0.3, exclude: ["*/fixtures/*"]}

This is a small local validator for this one command; the trainer's general one lives in
``modules/training/config.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modules.training.llm.documents import DataError, DataSource


class DataConfigError(ValueError):
    """The config file or an override is wrong; the message lists every problem."""


@dataclass
class TokenizerSpec:
    vocab_size: int | None = None       # train a new tokenizer with this many pieces
    from_model: str | None = None       # or copy this model folder's tokenizer
    max_sentences: int = 2_000_000


@dataclass
class DataConfig:
    name: str
    sources: list[DataSource]
    tokenizer: TokenizerSpec
    seq_len: int = 256
    val_fraction: float = 0.01
    seed: int = 0
    shard_sequences: int | None = None
    raw: dict = field(default_factory=dict, repr=False)   # the resolved config, as written to config.yaml


_TOP = {"name": str, "seq_len": int, "val_fraction": float, "seed": int, "shard_sequences": int,
        "tokenizer": dict, "sources": list}
_TOKENIZER = {"vocab_size": int, "from": str, "max_sentences": int}
_SOURCE = {"name": str, "paths": list, "weight": float, "text_field": str, "exclude": list}


def load_data_config(path: str | Path, overrides: list[str] = ()) -> DataConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides (``seq_len=128``, ``sources.0.weight=2``), validate."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataConfigError(f"config file {file} does not exist") from exc
    except yaml.YAMLError as exc:
        raise DataConfigError(f"{file} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataConfigError(f"{file} must be a YAML mapping (name:, sources:, ...), not {type(raw).__name__}")
    problems = [p for item in overrides for p in _apply_override(raw, item)]
    config = validate(raw, problems, where=str(file))
    return config


def validate(raw: dict, problems: list[str] | None = None, where: str = "config") -> DataConfig:
    """Check ``raw`` against the schema above; raise one :class:`DataConfigError` listing every problem."""
    problems = list(problems or [])
    _check_keys(raw, _TOP, "", problems)
    if "name" not in raw:
        problems.append("name: missing; the dataset is written to <data-dir>/training/data/<name>/")
    elif isinstance(raw["name"], str) and (not raw["name"] or "/" in raw["name"] or raw["name"].startswith(".")):
        problems.append(f"name: {raw['name']!r} must be a plain folder name")
    tok_raw = raw.get("tokenizer")
    tokenizer = TokenizerSpec()
    if tok_raw is None:
        problems.append("tokenizer: missing; give {vocab_size: N} to train one or {from: MODEL_FOLDER} to reuse one")
    elif isinstance(tok_raw, dict):
        _check_keys(tok_raw, _TOKENIZER, "tokenizer.", problems)
        if ("vocab_size" in tok_raw) == ("from" in tok_raw):
            problems.append("tokenizer: give exactly one of vocab_size (train a new tokenizer) or from (a model "
                            "folder whose tokenizer to reuse)")
        tokenizer = TokenizerSpec(vocab_size=tok_raw.get("vocab_size"), from_model=tok_raw.get("from"),
                                  max_sentences=tok_raw.get("max_sentences", 2_000_000))
    sources = []
    raw_sources = raw.get("sources")
    if raw_sources is None:
        problems.append("sources: missing; list at least one {name, paths} source")
    elif isinstance(raw_sources, list):
        if not raw_sources:
            problems.append("sources: empty; list at least one {name, paths} source")
        for index, item in enumerate(raw_sources):
            prefix = f"sources.{index}."
            if not isinstance(item, dict):
                problems.append(f"sources.{index}: must be a mapping with name and paths, not {item!r}")
                continue
            if isinstance(item.get("paths"), str):
                item["paths"] = [item["paths"]]
            before = len(problems)
            _check_keys(item, _SOURCE, prefix, problems)
            for required in ("name", "paths"):
                if required not in item:
                    problems.append(f"{prefix}{required}: missing")
            if len(problems) == before:
                try:
                    sources.append(DataSource(name=item["name"], paths=item["paths"], weight=item.get("weight"),
                                              text_field=item.get("text_field", "text"),
                                              exclude=item.get("exclude", [])))
                except DataError as exc:
                    problems.append(f"sources.{index}: {exc}")
    for key, minimum in (("seq_len", 1), ("seed", 0), ("shard_sequences", 1)):
        if isinstance(raw.get(key), int) and raw[key] < minimum:
            problems.append(f"{key}: {raw[key]} must be at least {minimum}")
    if isinstance(raw.get("val_fraction"), (int, float)) and not 0 <= raw["val_fraction"] < 1:
        problems.append(f"val_fraction: {raw['val_fraction']} must be at least 0 and below 1")
    if problems:
        raise DataConfigError(f"{where} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return DataConfig(name=raw["name"], sources=sources, tokenizer=tokenizer, seq_len=raw.get("seq_len", 256),
                      val_fraction=float(raw.get("val_fraction", 0.01)), seed=raw.get("seed", 0),
                      shard_sequences=raw.get("shard_sequences"), raw=raw)


def _check_keys(mapping: dict, schema: dict[str, type], prefix: str, problems: list[str]) -> None:
    for key, value in mapping.items():
        if key not in schema:
            problems.append(f"{prefix}{key}: unknown key; allowed here: {', '.join(schema)}")
            continue
        wanted = schema[key]
        ok = isinstance(value, wanted) and not isinstance(value, bool)
        if wanted is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "shard_sequences" and value is None:
            ok = True
        if not ok:
            problems.append(f"{prefix}{key}: {value!r} is a {type(value).__name__}, expected {_type_name(wanted)}")
        elif wanted is list and key != "sources" and not all(isinstance(v, str) for v in value):
            problems.append(f"{prefix}{key}: every entry must be text (a path or pattern), got {value!r}")


def _type_name(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "text", list: "a list", dict: "a mapping"}[kind]


def _apply_override(raw: dict, item: str) -> list[str]:
    """Set ``a.b.0.c=value`` in ``raw`` (value parsed as YAML); a problem message instead of raising."""
    if "=" not in item:
        return [f"override {item!r} must look like key=value (e.g. seq_len=128)"]
    key, _, text = item.partition("=")
    try:
        value: Any = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return [f"override {key}: {'.'.join(parts[:depth]) or 'top'} is a list of {len(node)}; "
                        f"{part!r} is not an index in it"]
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            return [f"override {key}: {'.'.join(parts[:depth])} is not a mapping or list"]
    return []
