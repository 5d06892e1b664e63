"""fp32 against bf16 for Atelier's Llama on the CPU: what ``--precision auto`` chooses for language models.

    python benchmarks/llm_precision.py                 # demo pair, SmolLM2-135M and TinyLlama-1.1B shapes, 4 layers
    python benchmarks/llm_precision.py --layers 22     # the full 1.1B shape (4.4 GB of fp32 weights)

Per model and dtype: batch-1 decode (one token per forward, KV cache, greedy loop over the model) and a
speculative verify pass (9 tokens in one forward after a 32-token prompt), each the median of several
timed runs after a warm-up. The ratio columns are bf16 time / fp32 time: below 1 means bf16 is faster.
Printed as one table; ``LLM_BF16_MIN_HIDDEN`` in modules/devices.py is the rule these numbers back.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.llm.config import LlamaConfig  # noqa: E402
from modules.llm.model import Llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 1.1B shape (22 = the full model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args()


def random_model(config: LlamaConfig) -> Llama:
    with torch.device("meta"):
        model = Llama(config)
    gen = torch.Generator().manual_seed(0)
    state = {name: (torch.ones(p.shape) if name.endswith("norm.weight")
                    else torch.empty(p.shape).normal_(0.0, 0.02, generator=gen))
             for name, p in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def demo_model(name: str) -> Llama:
    from modules.llm.loader import load_llm
    return load_llm(ROOT / "models" / "LLM" / name, "cpu", torch.float32).model


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


@torch.inference_mode()
def measure(model: Llama, repeats: int, decode_tokens: int = 16) -> tuple[float, float]:
    """(ms per decoded token at batch 1, ms per 9-token verify pass)."""
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, 32), generator=torch.Generator().manual_seed(1))
    cache = model.new_kv_cache(1, 32 + decode_tokens + 16)

    def decode() -> None:
        cache.reset()
        logits = model(prompt, cache=cache, last_only=True)
        for _ in range(decode_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(token, cache=cache, last_only=True)

    def verify() -> None:
        cache.truncate(32)
        model(prompt[:, :9], cache=cache)

    decode_ms = median_ms(decode, repeats) / (decode_tokens + 0.0)
    cache.reset()
    model(prompt, cache=cache, last_only=True)
    verify_ms = median_ms(verify, repeats * 3)
    return decode_ms, verify_ms


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    big = LlamaConfig.from_name("tinyllama-1.1b", num_hidden_layers=args.layers)
    # SmolLM2-135M's widths (576 / 1536, 9 heads of 64, 3 KV heads, 49152 tokens)
    smol = LlamaConfig.from_name("tinyllama-1.1b", num_hidden_layers=args.layers, hidden_size=576,
                                 intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                 vocab_size=49152)
    models = {"atelier-tiny-chat (width 288)": lambda: demo_model("atelier-tiny-chat"),
              "atelier-tiny-draft (width 128)": lambda: demo_model("atelier-tiny-draft"),
              f"smollm2-135m shape (width 576), {args.layers} layers": lambda: random_model(smol),
              f"tinyllama-1.1b shape (width 2048), {args.layers} layers": lambda: random_model(big)}
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print(f"| model | fp32 decode ms/token | bf16 decode ms/token | bf16/fp32 decode | fp32 verify-9 ms | "
          f"bf16 verify-9 ms | bf16/fp32 verify | verify-9 / decode-1 fp32 | bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, make in models.items():
        model = make()
        d32, v32 = measure(model.float(), args.repeats)
        d16, v16 = measure(model.to(torch.bfloat16), args.repeats)
        print(f"| {label} | {d32:.2f} | {d16:.2f} | {d16 / d32:.2f} | {v32:.2f} | {v16:.2f} | {v16 / v32:.2f} | "
              f"{v32 / d32:.2f} | {v16 / d16:.2f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
