"""Cost of constrained JSON decoding (response_format) on the engine, against free sampling.

    python benchmarks/json_constraint.py                       # the shipped demo model (vocab 4096)
    python benchmarks/json_constraint.py --model PATH --runs 5  # any Llama folder (e.g. a 32k-vocab model)

Prints one table: building the tokenizer's byte table for llguidance (once per tokenizer), compiling a schema
(once per request), the per-step mask (``JsonConstraint.allowed``, median over every step of the runs), and
the decode time per token (after the first) of the same model with and without the grammar (same seeds, temperature 1).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.llm.engine import GenerationRequest, eos_token_ids, generate  # noqa: E402
from modules.llm.json_constraint import GrammarCompiler, JsonConstraint  # noqa: E402
from modules.llm.loader import load_llm  # noqa: E402
from modules.llm.sampling import SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4}}}


class _TimedSpec:
    """Wraps a spec so every row's ``allowed()`` is timed (the engine calls it once per step)."""

    def __init__(self, spec, times: list[float]):
        self.spec, self.times = spec, times

    def start(self):
        inner = self.spec.start()
        times = self.times

        class Timed(JsonConstraint):
            def allowed(self):
                started = time.perf_counter()
                mask = super().allowed()
                times.append(time.perf_counter() - started)
                return mask

        return Timed(inner.spec, inner.matcher)


def _decode_per_token(result) -> float:
    """Seconds per token after the first (the prefill that yields the first token is left out)."""
    return (result.seconds - result.prefill_seconds) / max(1, result.completion_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "models/LLM/atelier-tiny-chat"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    llm = load_llm(args.model, "cpu", torch.float32)
    eos = eos_token_ids(llm)
    compiler = GrammarCompiler()
    started = time.perf_counter()
    compiler.lltokenizer(llm.tokenizer, llm.config.vocab_size, eos)
    table_s = time.perf_counter() - started
    started = time.perf_counter()
    spec = compiler.compile(SCHEMA, llm.tokenizer, llm.config.vocab_size, eos)
    compile_s = time.perf_counter() - started
    prompt = llm.tokenizer.encode("Describe a person as JSON:", add_bos=True)
    mask_times: list[float] = []
    free_per_token, json_per_token, json_tokens = [], [], []
    for seed in range(args.runs):
        free = generate(llm, [GenerationRequest(prompt, SamplingParams(seed=seed, max_new_tokens=args.max_new,
                                                                       ignore_eos=True))])[0]
        free_per_token.append(_decode_per_token(free))
        constrained = generate(llm, [GenerationRequest(prompt, SamplingParams(
            seed=seed, max_new_tokens=args.max_new, constraint=_TimedSpec(spec, mask_times)))])[0]
        json_per_token.append(_decode_per_token(constrained))
        json_tokens.append(constrained.completion_tokens)
    rows = [("model", f"{Path(args.model).name} (vocab {llm.config.vocab_size})"),
            ("token table for llguidance (once per tokenizer)", f"{table_s * 1000:.1f} ms"),
            ("schema compile (once per request)", f"{compile_s * 1000:.2f} ms"),
            ("mask per step, median", f"{statistics.median(mask_times) * 1e6:.0f} us"),
            ("decode per token, free", f"{statistics.median(free_per_token) * 1000:.2f} ms"),
            ("decode per token, JSON schema", f"{statistics.median(json_per_token) * 1000:.2f} ms"),
            ("JSON reply length, median tokens", f"{statistics.median(json_tokens):.0f}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
