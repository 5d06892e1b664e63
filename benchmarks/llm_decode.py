"""Decode and prefill speed of Atelier's Llama against transformers, on a TinyLlama-1.1B-shaped model.

    python benchmarks/llm_decode.py              # full 22 layers: ~4.4 GB of fp32 weights, a few minutes
    python benchmarks/llm_decode.py --layers 2   # quick check of the script itself

Both implementations run the same random weights (std 0.02, seed 0; shared tensors, so the memory is
paid once), fp32, on the CPU, in one process. The host is shared and its speed drifts, so the
measurements are interleaved in rounds (bandwidth, Atelier, transformers, back to back) and ratios
are taken within a round; medians are reported. The method follows
../shared/reference/cpu-baselines.md section 2:

* decode rate = (n - 1) / (time of the last token - time of the first token): the prefill that
  produces the first token is excluded. Batch-1 decode, and batch-8 total throughput.
* prefill rate = prompt tokens / time of one forward over the prompt (logits of the last token only).
* memory bandwidth = bytes / time of ``buffer.sum()`` over a 1 GiB fp32 buffer with 2 threads (the
  read rate decode needs), median of 5, measured at the start of every round.
* weight bytes per token = every weight except the embedding table (only one row of it is read).

Atelier is measured through the serving engine (``modules.llm.engine.generate``, greedy, EOS ignored)
when it is importable, otherwise through a plain greedy loop over the model; the table says which.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.llm.config import LlamaConfig  # noqa: E402
from modules.llm.cpu_threading import ROW_PARALLEL_DEFAULT  # noqa: E402
from modules.llm.model import Llama  # noqa: E402
from modules.weight_bytes import tensors_bytes  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded at batch 1, per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved batch-1 rounds (Atelier, transformers)")
    p.add_argument("--batch-rounds", type=int, default=1, help="interleaved rounds of prefill and batch runs")
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput run")
    p.add_argument("--batch-tokens", type=int, default=16, help="tokens decoded per row in the batch run")
    p.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill run")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer size of the bandwidth test")
    p.add_argument("--skip-hf", action="store_true", help="measure Atelier only")
    return p.parse_args()


# --------------------------------------------------------------------------------------- measurements
def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(gib: float) -> float:
    """Read GB/s of ``sum()`` over a ``gib`` GiB fp32 buffer (what streaming weights needs)."""
    a = torch.ones(int(gib * 2**30 // 4))
    a.sum()
    return a.numel() * 4 / median_time(lambda: a.sum(), 5) / 1e9


def build_models(layers: int, with_hf: bool):
    """Atelier's model with random weights, and transformers' model sharing the same tensors."""
    config = LlamaConfig.from_name("tinyllama-1.1b", num_hidden_layers=layers)
    with torch.device("meta"):
        ours = Llama(config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, param in ours.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape)
        else:
            state[name] = torch.empty(param.shape).normal_(0.0, 0.02, generator=gen)
    ours.load_state_dict(state, assign=True)
    ours.eval().requires_grad_(False)
    hf = None
    if with_hf:
        import transformers
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        hf_config = transformers.LlamaConfig(**config.to_hf_dict())
        hf_config._attn_implementation = "sdpa"
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(hf_config)
        hf.load_state_dict(state, assign=True, strict=True)
        hf.model.rotary_emb = LlamaRotaryEmbedding(config=hf_config)   # its buffers were on meta
        hf.eval().requires_grad_(False)
    return config, ours, hf


class _Stamps:
    """Records when each new token appears (an engine sink, or a transformers LogitsProcessor)."""

    def __init__(self):
        self.times: list[float] = []
        self.interrupted = False

    def emit(self, item) -> None:
        self.times.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores

    def rate(self, rows: int = 1) -> float:
        steps = len(self.times) // rows
        first, last = self.times[rows - 1], self.times[-1]
        return rows * (steps - 1) / (last - first)


class _SilentDecoder:
    """The engine streams text; random weights have no tokenizer, so stream nothing."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def ours_decode(config, model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]], str]:
    """Greedy decode through the engine when available; returns (tokens/s, tokens per row, how)."""
    try:
        from modules.llm.engine import GenerationRequest, generate
        from modules.llm.sampling import SamplingParams
    except ImportError:
        generate = None
    if generate is not None:
        stamps = _Stamps()
        llm = SimpleNamespace(model=model, config=config, generation_config={},
                              device=model.model.embed_tokens.weight.device,
                              tokenizer=SimpleNamespace(eos_id=None, id_to_token=lambda i: ""))
        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        requests = [GenerationRequest(prompt_ids=p, params=params) for p in prompts]
        try:   # the paged engine LLMEngine serves with (issue 11); the contiguous loop before it
            from modules.llm.paged.block_pool import BLOCK_SIZE
            from modules.llm.paged.kv_memory import new_pool
            from modules.llm.paged.paged_engine import generate_paged
        except ImportError:
            results = generate(llm, requests, [stamps] * len(prompts), stream_decoder=_SilentDecoder)
            return stamps.rate(len(prompts)), [r.token_ids for r in results], "engine.generate"
        blocks = 2 + sum(-(-(len(p) + new_tokens) // BLOCK_SIZE) for p in prompts)
        results = generate_paged(llm, new_pool(llm, blocks), requests, [stamps] * len(prompts),
                                 max_batch=len(prompts), stream_decoder=_SilentDecoder)
        return stamps.rate(len(prompts)), [r.token_ids for r in results], "paged engine"
    stamps = _Stamps()
    with torch.inference_mode():
        cache = model.new_kv_cache(len(prompts), len(prompts[0]) + new_tokens)
        logits = model(torch.tensor(prompts), cache=cache, last_only=True)
        tokens = []
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            stamps.times.extend([time.perf_counter()] * len(prompts))
            tokens.append(nxt)
            logits = model(nxt, cache=cache)
    return stamps.rate(len(prompts)), torch.cat(tokens, 1).tolist(), "greedy loop (no engine.py yet)"


def hf_decode(hf, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from transformers import LogitsProcessorList

    stamps = _Stamps()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
                          logits_processor=LogitsProcessorList([stamps]))
    stamps.times = [t for t in stamps.times for _ in range(len(prompts))]
    return stamps.rate(len(prompts)), out[:, ids.shape[1]:].tolist()


def prefill_rate(fn, tokens: int) -> float:
    fn(64)                                       # warm-up (allocator, thread pool)
    return tokens / median_time(lambda: fn(tokens), 2)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.layers} layers, fp32, CPU; "
          f"{args.rounds} interleaved rounds (median reported)")
    started = time.perf_counter()
    config, ours, hf = build_models(args.layers, with_hf=not args.skip_hf)
    weight_bytes = tensors_bytes(p for n, p in ours.named_parameters() if "embed_tokens" not in n)
    print(f"models built in {time.perf_counter() - started:.0f} s: {ours.num_parameters():,} parameters, "
          f"{weight_bytes / 1e9:.3f} GB of weights read per decode step")

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt), generator=gen).tolist()
    batch_prompts = torch.randint(3, config.vocab_size, (args.batch, args.prompt), generator=gen).tolist()
    long_prompt = torch.randint(3, config.vocab_size, (1, args.prefill), generator=gen)

    def ours_prefill(n: int) -> None:
        with torch.inference_mode():
            ours(long_prompt[:, :n], cache=ours.new_kv_cache(1, n), last_only=True)

    def hf_prefill(n: int) -> None:
        with torch.inference_mode():
            hf(long_prompt[:, :n], use_cache=True, logits_to_keep=1)

    # The host is shared and its speed drifts by 2x within minutes, so every round measures the
    # bandwidth, Atelier and transformers back to back, and ratios are taken within a round.
    # "Atelier" is the default configuration (setting llm.cpu_row_parallel = ROW_PARALLEL_DEFAULT); each round
    # also decodes with the other choice, so the default stays earned by measurement.
    default_rp = args.threads if ROW_PARALLEL_DEFAULT else None
    other_rp = None if ROW_PARALLEL_DEFAULT else args.threads
    other = "Atelier, row-parallel GEMV " + ("off" if ROW_PARALLEL_DEFAULT else "on")
    ours.use_row_parallel(default_rp)
    ours_decode(config, ours, prompt, 4)                                  # warm-ups
    if hf is not None:
        hf_decode(hf, prompt, 4)
    r: dict[str, list[float]] = {}
    same = None
    how = ""
    for i in range(args.rounds):
        r.setdefault("bw", []).append(memory_bandwidth(args.bandwidth_gib))
        rate, our_tokens, how = ours_decode(config, ours, prompt, args.new_tokens)
        r.setdefault("ours1", []).append(rate)
        r.setdefault("share", []).append(weight_bytes * rate / 1e9 / r["bw"][-1])
        if hf is not None:
            rate, hf_tokens = hf_decode(hf, prompt, args.new_tokens)
            r.setdefault("hf1", []).append(rate)
            r.setdefault("ratio1", []).append(r["ours1"][-1] / rate)
            same = hf_tokens == our_tokens if same is None else same and hf_tokens == our_tokens
        ours.use_row_parallel(other_rp)
        r.setdefault("plain1", []).append(ours_decode(config, ours, prompt, args.new_tokens)[0])
        ours.use_row_parallel(default_rp)
        print(f"  round {i + 1}: read BW {r['bw'][-1]:.1f} GB/s, Atelier {r['ours1'][-1]:.2f} tok/s"
              + (f", transformers {r['hf1'][-1]:.2f} tok/s" if hf is not None else "")
              + f", {other} {r['plain1'][-1]:.2f} tok/s", flush=True)
    ours.use_row_parallel(None)  # prefill is compute-bound: never row-parallel
    for i in range(args.batch_rounds):
        r.setdefault("ours_pf", []).append(prefill_rate(ours_prefill, args.prefill))
        if hf is not None:
            r.setdefault("hf_pf", []).append(prefill_rate(hf_prefill, args.prefill))
            r.setdefault("ratio_pf", []).append(r["ours_pf"][-1] / r["hf_pf"][-1])
    ours.use_row_parallel(default_rp)
    for i in range(args.batch_rounds):
        r.setdefault("ours8", []).append(ours_decode(config, ours, batch_prompts, args.batch_tokens)[0])
        if hf is not None:
            r.setdefault("hf8", []).append(hf_decode(hf, batch_prompts, args.batch_tokens)[0])
            r.setdefault("ratio8", []).append(r["ours8"][-1] / r["hf8"][-1])
    m = {k: statistics.median(v) for k, v in r.items()}

    print(f"\nAtelier measured through {how}; greedy tokens identical to transformers: "
          f"{'n/a' if same is None else 'yes' if same else 'NO'}")
    print(f"memory read bandwidth (sum over {args.bandwidth_gib:g} GiB): median {m['bw']:.1f} GB/s, "
          f"rounds {', '.join(f'{x:.1f}' for x in r['bw'])}\n")
    rows = [("Atelier", "decode B=1", m["ours1"], True),
            (other, "decode B=1", m["plain1"], True),
            ("Atelier", f"prefill {args.prefill}", m["ours_pf"], False),
            ("Atelier", f"decode B={args.batch} (total)", m["ours8"], False)]
    if hf is not None:
        rows += [("transformers", "decode B=1", m["hf1"], True),
                 ("transformers", f"prefill {args.prefill}", m["hf_pf"], False),
                 ("transformers", f"decode B={args.batch} (total)", m["hf8"], False)]
    print(f"| {'implementation':30} | {'run':22} | {'tokens/s':>9} | {'weights GB/s':>12} | {'% of median BW':>14} |")
    print(f"|{'-' * 32}|{'-' * 24}|{'-' * 11}|{'-' * 14}|{'-' * 16}|")
    for impl, run, rate, streams in rows:
        gbs = weight_bytes * rate / 1e9
        bw = f"{gbs:12.1f}" if streams else " " * 12
        share = f"{100 * gbs / m['bw']:13.0f}%" if streams else " " * 14
        print(f"| {impl:30} | {run:22} | {rate:9.2f} | {bw} | {share} |")
    print()
    if hf is not None:
        for key, run in (("ratio1", "decode B=1"), ("ratio_pf", f"prefill {args.prefill}"),
                         ("ratio8", f"decode B={args.batch}")):
            print(f"Atelier / transformers, {run}: {m[key]:.2f}x (median of per-round ratios: "
                  f"{', '.join(f'{x:.2f}' for x in r[key])})")
    print(f"Atelier batch-1 decode reads weights at {100 * m['share']:.0f}% of the read bandwidth measured in "
          f"the same round (per round: {', '.join(f'{100 * x:.0f}%' for x in r['share'])})")


if __name__ == "__main__":
    main()
