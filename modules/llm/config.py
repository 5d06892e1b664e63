"""Llama-2 architecture hyper-parameters, read from and written to Hugging Face ``config.json``.

One dataclass covers every model Atelier runs (Llama-2, TinyLlama, and other Llama-architecture
checkpoints with grouped-query attention). The field names are Hugging Face's, so a ``config.json``
maps onto it key for key and :meth:`LlamaConfig.to_hf_dict` writes one that ``transformers`` loads.

Validation collects every problem first and raises one ``ValueError`` naming the file (when there is
one), each field, the value found and what to do, so a broken download is diagnosed in one go.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: rope_scaling types this implementation computes (HF names; "type" and "rope_type" both accepted).
ROPE_SCALING_TYPES = ("linear", "dynamic")

#: Fields a config.json must carry: without them the tensor shapes cannot be known.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    #: GQA: query heads are split into ``num_key_value_heads`` groups that share one K/V head each.
    #: None in a config.json means multi-head attention (as many K/V heads as query heads).
    num_key_value_heads: int | None = None
    head_dim: int | None = None              # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6               # HF's class default; TinyLlama's config says 1e-5
    rope_theta: float = 10000.0
    #: None, {"type": "linear", "factor": f} or {"type": "dynamic", "factor": f}
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    #: dtype the checkpoint was saved in ("float32", "bfloat16", ...), informative only.
    torch_dtype: str | None = None
    #: where this config came from, for error messages; not written back
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_pos_int(self.hidden_size) and _is_pos_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None and isinstance(self.rope_scaling, dict):
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind in (None, "default"):
                self.rope_scaling = None
            else:
                self.rope_scaling = {"type": kind, "factor": self.rope_scaling.get("factor")}
        problems = self.problems()
        if problems:
            where = f" in {self.source}" if self.source else ""
            raise ValueError(f"Invalid Llama config{where}:\n  - " + "\n  - ".join(problems))

    # ----------------------------------------------------------------------------------------- checks
    def problems(self) -> list[str]:
        """Every reason this config cannot describe a model, as readable sentences."""
        out = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_pos_int(value):
                out.append(f"{name} must be a positive integer, got {value!r}")
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if _is_pos_int(heads) and _is_pos_int(kv) and heads % kv:
            out.append(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv}): "
                       "each key/value head serves a whole group of query heads")
        if not isinstance(self.rms_norm_eps, (int, float)) or isinstance(self.rms_norm_eps, bool) \
                or not self.rms_norm_eps > 0:
            out.append(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) \
                or not self.rope_theta > 0:
            out.append(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.hidden_act != "silu":
            out.append(f"hidden_act {self.hidden_act!r} is not supported; Llama models use 'silu'")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                out.append(f"rope_scaling must be an object like {{\"type\": \"linear\", \"factor\": 2.0}}, "
                           f"got {self.rope_scaling!r}")
            else:
                kind, factor = self.rope_scaling.get("type"), self.rope_scaling.get("factor")
                if kind not in ROPE_SCALING_TYPES:
                    out.append(f"rope_scaling type {kind!r} is not supported; use one of {ROPE_SCALING_TYPES}")
                if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1:
                    out.append(f"rope_scaling factor must be a number >= 1, got {factor!r}")
        return out

    # ---------------------------------------------------------------------------------- derived sizes
    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (1 = multi-head attention, num_attention_heads = multi-query)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Exact parameter count of the model this config builds (tied embeddings counted once)."""
        d, hd, v = self.hidden_size, self.head_dim, self.vocab_size
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if self.attention_bias else 0)
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        heads = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + heads + d

    # --------------------------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str | None = None) -> "LlamaConfig":
        """Build from a parsed HF ``config.json``; unknown keys are ignored, problems are all reported."""
        where = f" in {source}" if source else ""
        if not isinstance(data, dict):
            raise ValueError(f"Invalid Llama config{where}: expected a JSON object, got {type(data).__name__}")
        problems = [f"required field {name!r} is missing" for name in _REQUIRED if name not in data]
        model_type = data.get("model_type")
        if model_type is not None and model_type not in ("llama", "mistral"):
            problems.append(f"model_type is {model_type!r}; Atelier's LLM loader supports Llama-architecture "
                            "models (model_type 'llama')")
        if problems:
            raise ValueError(f"Invalid Llama config{where}:\n  - " + "\n  - ".join(problems))
        known = {f.name for f in fields(cls)} - {"source", "torch_dtype"}
        kwargs = {k: data[k] for k in known if k in data}
        kwargs["torch_dtype"] = data.get("torch_dtype", data.get("dtype"))
        # transformers >= 5 writes "rope_parameters" (theta and scaling together) instead of the legacy keys.
        rope = data.get("rope_parameters")
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
            if "rope_scaling" not in data:
                kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        return cls(**kwargs, source=source)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No config.json at {path}: a Hugging Face model folder needs one "
                                    "(download it together with the weights).")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"Invalid Llama config in {path}: not valid JSON ({exc})") from exc
        return cls.from_hf_dict(data, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``LlamaConfig`` / ``AutoConfig`` reads back."""
        out = {k: v for k, v in asdict(self).items() if k not in ("source", "torch_dtype")}
        out["architectures"] = ["LlamaForCausalLM"]
        out["model_type"] = "llama"
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"type": self.rope_scaling["type"], "rope_type": self.rope_scaling["type"],
                                   "factor": self.rope_scaling["factor"]}
        return out

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # ---------------------------------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A named preset (see :data:`PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown Llama preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Unknown LlamaConfig field(s) {unknown} given to from_name({name!r})")
        return cls(**{**PRESETS[name], **overrides})


def _is_pos_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


#: Named architectures. tinyllama-1.1b is TinyLlama-1.1B(-Chat-v1.0): 1,100,048,384 parameters.
PRESETS: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=10000.0),
    # Tiny shapes for tests and fixtures: GQA 2:1, runs in milliseconds on a CPU.
    "tiny-gqa": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rms_norm_eps=1e-5, rope_theta=10000.0),
}
