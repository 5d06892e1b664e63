"""Speculative decoding on the shipped demo pair against plain greedy decoding: speed, acceptance, identity.

    python benchmarks/speculative.py                   # fp32 and bf16, every prompt, 3 rounds
    python benchmarks/speculative.py --dtypes fp32 --rounds 1

Target ``models/LLM/atelier-tiny-chat``, draft ``models/LLM/atelier-tiny-draft``, loaded as the service
loads them. Per prompt (chat-templated, greedy, up to --max-new tokens, stopping at EOS as a chat reply
does): the plain engine (:func:`modules.llm.engine.generate`, batch 1) and
:func:`modules.llm.speculative.generate_speculative` with ``llm.speculative_k``'s default, interleaved
in rounds (the host is shared; medians are reported). tokens/s = completion tokens / wall time of the
whole call, prefill included, on both sides. Acceptance = accepted / drafted tokens; accepted per round =
accepted drafts / verify passes; tokens per pass = completion tokens / target forward passes (the
speed-up in target passes, before the draft's own cost); speed-up = speculative tokens/s over plain tokens/s;
identical = the speculative tokens equal the plain ones (with --chat-sampling the two draw different samples
of the same distribution, so the token counts, shown plain / speculative, differ too). The last row of each dtype sums every prompt's tokens and times (the headline figure).
A first table gives the cost of one target step, one verify pass and one draft step (where the time goes).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.llm.draft_settings import DEFAULT_MAX_K  # noqa: E402
from modules.llm.engine import GenerationRequest, generate  # noqa: E402
from modules.llm.sampling import SamplingParams  # noqa: E402
from modules.llm.speculative import generate_speculative  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: prompts of the demo model's task families (docs, drawing, arithmetic, formatting) and open-ended ones
PROMPTS = [
    "What is Atelier?",
    "How do I install Atelier?",
    "Where do I put LoRA files?",
    "How do I use the OpenAI API with Atelier?",
    "Draw a big red circle in the top left on a blue background.",
    "Please draw two small green squares at the bottom.",
    "What is 17 + 25?",
    "Write the words apple, pear and plum as a numbered list.",
    "Tell me a story about a robot who learns to paint.",
    "Explain how speculative decoding works.",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    p.add_argument("--max-new", type=int, default=160, help="most new tokens per reply")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate --max-new tokens past EOS (long replies: what the model writes after a reply)")
    p.add_argument("--chat-sampling", action="store_true",
                   help="sample with the Chat tab's default settings (temperature 0.7, top-k 40, top-p 0.95, min-p "
                        "0.05, repetition penalty 1.1, seed 0) instead of greedy; 'identical' is then not expected")
    p.add_argument("--k", type=int, default=DEFAULT_MAX_K, help="most drafted tokens per round")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--target", default="atelier-tiny-chat")
    p.add_argument("--draft", default="atelier-tiny-draft")
    return p.parse_args()


def load(name: str, dtype: torch.dtype):
    from modules.llm.loader import load_llm
    return load_llm(ROOT / "models" / "LLM" / name, "cpu", dtype)


def prompt_ids(llm, text: str) -> list[int]:
    from modules.llm.service import render_prompt
    return render_prompt(llm, [{"role": "user", "content": text}])[1]


@torch.inference_mode()
def step_costs(target, draft, repeats: int = 5, steps: int = 100) -> dict[str, float]:
    """Median ms of: a target decode step and a 6-token verify pass (the model's forward, what both plain and
    speculative decoding run), a draft step through the model's forward and through the LeanDecoder the
    speculative path uses; after a 40-token context."""
    from modules.llm.lean_decode import lean_decoder
    ids = list(range(5, 45))
    cache, draft_cache = target.model.new_kv_cache(1, 64), draft.model.new_kv_cache(1, 64)
    lean = lean_decoder(draft.model, 64)
    target.model(torch.tensor([ids]), cache=cache)
    draft.model(torch.tensor([ids]), cache=draft_cache)
    lean(ids)

    def run(model, kv, n):
        kv.truncate(40)
        model(torch.tensor([[5] * n]), cache=kv, last_only=n == 1)

    def lean_step():
        lean.truncate(40)
        lean([5])

    cases = {"target step": lambda: run(target.model, cache, 1), "target verify-6": lambda: run(target.model, cache, 6),
             "draft step (model forward)": lambda: run(draft.model, draft_cache, 1), "draft step (lean)": lean_step}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):                      # interleaved: the host's speed drifts
        for name, fn in cases.items():
            fn()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(f"torch {torch.__version__}, {args.threads} threads, k <= {args.k}, max_new {args.max_new}"
          f"{' (EOS ignored)' if args.ignore_eos else ''}, median of {args.rounds} rounds")
    print("| dtype | step | ms | x a target step |\n|---|---|---|---|")
    for label in args.dtypes.split(","):
        costs = step_costs(load(args.target, dtypes[label]), load(args.draft, dtypes[label]))
        for name, ms in costs.items():
            print(f"| {label} | {name} | {ms:.2f} | {ms / costs['target step']:.2f} |", flush=True)
    print()
    print("| dtype | prompt | tokens | plain tok/s | speculative tok/s | speed-up | acceptance | accepted/round "
          "| tokens/pass | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label in args.dtypes.split(","):
        dtype = dtypes[label]
        target, draft = load(args.target, dtype), load(args.draft, dtype)
        sampling = (dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1, seed=0)
                    if args.chat_sampling else dict(temperature=0))
        params = SamplingParams(max_new_tokens=args.max_new, ignore_eos=args.ignore_eos, **sampling)
        total_plain = total_spec = 0.0
        plain_tokens = spec_tokens = 0
        all_identical = True
        sums = {"draft": 0, "accepted": 0, "passes": 0}
        # warm-up: first calls allocate and pick kernels
        warm = GenerationRequest(prompt_ids(target, PROMPTS[0]), params)
        generate(target, [warm])
        generate_speculative(target, draft, warm, max_k=args.k)
        for text in PROMPTS:
            ids = prompt_ids(target, text)
            plain_t, spec_t = [], []
            plain = spec = None
            for _ in range(args.rounds):
                start = time.perf_counter()
                plain = generate(target, [GenerationRequest(list(ids), params)])[0]
                plain_t.append(time.perf_counter() - start)
                start = time.perf_counter()
                spec = generate_speculative(target, draft, GenerationRequest(list(ids), params), max_k=args.k)
                spec_t.append(time.perf_counter() - start)
            tp, ts = statistics.median(plain_t), statistics.median(spec_t)
            n, m = plain.completion_tokens, spec.completion_tokens   # differ only when sampling
            identical = spec.token_ids == plain.token_ids
            all_identical &= identical
            total_plain, total_spec = total_plain + tp, total_spec + ts
            plain_tokens, spec_tokens = plain_tokens + n, spec_tokens + m
            sums["draft"] += spec.draft_tokens
            sums["accepted"] += spec.accepted_tokens
            sums["passes"] += spec.target_passes
            rounds = max(1, spec.target_passes - 1)
            tokens = str(n) if n == m else f"{n} / {m}"
            print(f"| {label} | {text[:40]} | {tokens} | {n / tp:.1f} | {m / ts:.1f} | {(m / ts) / (n / tp):.2f}x | "
                  f"{spec.accepted_tokens / max(1, spec.draft_tokens):.0%} | {spec.accepted_tokens / rounds:.2f} | "
                  f"{m / spec.target_passes:.2f} | {'yes' if identical else 'NO'} |", flush=True)
        rounds = max(1, sums["passes"] - len(PROMPTS))
        plain_rate, spec_rate = plain_tokens / total_plain, spec_tokens / total_spec
        tokens = str(plain_tokens) if plain_tokens == spec_tokens else f"{plain_tokens} / {spec_tokens}"
        print(f"| **{label}** | **all {len(PROMPTS)} prompts** | {tokens} | {plain_rate:.1f} | {spec_rate:.1f} | "
              f"**{spec_rate / plain_rate:.2f}x** | {sums['accepted'] / max(1, sums['draft']):.0%} | "
              f"{sums['accepted'] / rounds:.2f} | {spec_tokens / sums['passes']:.2f} | "
              f"{'yes' if all_identical else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
