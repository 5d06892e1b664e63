"""Decode and prefill speed of Atelier's Llama against transformers, on a TinyLlama-1.1B-shaped model.

    python benchmarks/llm_decode.py              # full 22 layers: ~4.4 GB of fp32 weights, a few minutes
    python benchmarks/llm_decode.py --layers 2   # quick check of the script itself

Both implementations run the same random weights (std 0.02, seed 0; shared tensors, so the memory is
paid once), fp32, on the CPU, in one process, one after the other. The method follows
../shared/reference/cpu-baselines.md section 2:

* decode rate = (n - 1) / (time of the last token - time of the first token): the prefill that
  produces the first token is excluded. Batch-1 decode, and batch-8 total throughput.
* prefill rate = prompt tokens / time of one forward over the prompt (logits of the last token only).
* memory bandwidth = bytes / time of ``buffer.sum()`` over a 2 GiB fp32 buffer (the read rate decode
  needs), plus ``copy_`` (read + write), measured in the same run, median of 5.
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
from modules.llm.model import Llama  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded at batch 1")
    p.add_argument("--batch", type=int, default=8, help="batch size of the throughput run")
    p.add_argument("--batch-tokens", type=int, default=32, help="tokens decoded per row in the batch run")
    p.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill run")
    p.add_argument("--bandwidth-gib", type=float, default=2.0, help="buffer size of the bandwidth test")
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


def memory_bandwidth(gib: float) -> tuple[float, float]:
    """(read GB/s via sum, read+write GB/s via copy_) over ``gib`` GiB fp32 buffers."""
    n = int(gib * 2**30 // 4)
    a = torch.ones(n)
    b = torch.empty(n)
    a.sum()
    b.copy_(a)
    read = a.numel() * 4 / median_time(lambda: a.sum(), 5) / 1e9
    copy = 2 * a.numel() * 4 / median_time(lambda: b.copy_(a), 5) / 1e9
    return read, copy


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
                              tokenizer=SimpleNamespace(eos_id=None, id_to_token=lambda i: ""))
        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
        requests = [GenerationRequest(prompt_ids=p, params=params) for p in prompts]
        results = generate(llm, requests, [stamps] * len(prompts), stream_decoder=_SilentDecoder)
        return stamps.rate(len(prompts)), [r.token_ids for r in results], "engine.generate"
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
    print(f"torch {torch.__version__}, {args.threads} threads, {args.layers} layers, fp32, CPU")
    read_bw, copy_bw = memory_bandwidth(args.bandwidth_gib)
    print(f"memory bandwidth: read (sum) {read_bw:.1f} GB/s, copy (read+write) {copy_bw:.1f} GB/s")

    started = time.perf_counter()
    config, ours, hf = build_models(args.layers, with_hf=not args.skip_hf)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters()
                       if "embed_tokens" not in n)
    print(f"models built in {time.perf_counter() - started:.0f} s: {ours.num_parameters():,} parameters, "
          f"{weight_bytes / 1e9:.3f} GB of weights read per decode step")

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt), generator=gen).tolist()
    batch_prompts = torch.randint(3, config.vocab_size, (args.batch, args.prompt), generator=gen).tolist()
    long_prompt = torch.randint(3, config.vocab_size, (1, args.prefill), generator=gen)
    rows = []

    def ours_prefill(n: int, model=ours) -> None:
        with torch.inference_mode():
            model(long_prompt[:, :n], cache=model.new_kv_cache(1, n), last_only=True)

    def hf_prefill(n: int) -> None:
        with torch.inference_mode():
            hf(long_prompt[:, :n], use_cache=True, logits_to_keep=1)

    ours.use_row_parallel(args.threads)
    ours_decode(config, ours, prompt, 4)                                   # warm-up
    rate, our_tokens, how = ours_decode(config, ours, prompt, args.new_tokens)
    rows.append(("Atelier", "decode B=1", rate, weight_bytes * rate / 1e9))
    ours.use_row_parallel(None)
    rate_plain, _, _ = ours_decode(config, ours, prompt, args.new_tokens)
    rows.append(("Atelier, no row-parallel GEMV", "decode B=1", rate_plain, weight_bytes * rate_plain / 1e9))
    rows.append(("Atelier", f"prefill {args.prefill}", prefill_rate(ours_prefill, args.prefill), None))
    ours.use_row_parallel(args.threads)
    batch_rate, _, _ = ours_decode(config, ours, batch_prompts, args.batch_tokens)
    rows.append(("Atelier", f"decode B={args.batch} (total)", batch_rate, None))

    same = None
    if hf is not None:
        hf_decode(hf, prompt, 4)
        rate, hf_tokens = hf_decode(hf, prompt, args.new_tokens)
        same = hf_tokens == our_tokens
        rows.append(("transformers", "decode B=1", rate, weight_bytes * rate / 1e9))
        rows.append(("transformers", f"prefill {args.prefill}", prefill_rate(hf_prefill, args.prefill), None))
        rate, _ = hf_decode(hf, batch_prompts, args.batch_tokens)
        rows.append(("transformers", f"decode B={args.batch} (total)", rate, None))

    print(f"\nAtelier measured through {how}; greedy tokens identical to transformers: "
          f"{'n/a' if same is None else 'yes' if same else 'NO'}\n")
    print(f"| {'implementation':32} | {'run':22} | {'tokens/s':>9} | {'weights GB/s':>12} | {'% of read BW':>12} |")
    print(f"|{'-' * 34}|{'-' * 24}|{'-' * 11}|{'-' * 14}|{'-' * 14}|")
    for impl, run, rate, gbs in rows:
        bw = f"{gbs:12.1f}" if gbs else " " * 12
        share = f"{100 * gbs / read_bw:11.0f}%" if gbs else " " * 12
        print(f"| {impl:32} | {run:22} | {rate:9.2f} | {bw} | {share} |")
    by = {(i, r): rate for i, r, rate, _ in rows}
    if hf is not None:
        print()
        for run in ("decode B=1", f"prefill {args.prefill}", f"decode B={args.batch} (total)"):
            print(f"Atelier / transformers, {run}: {by[('Atelier', run)] / by[('transformers', run)]:.2f}x")
    share = weight_bytes * by[("Atelier", "decode B=1")] / 1e9 / read_bw
    print(f"Atelier batch-1 decode reads weights at {100 * share:.0f}% of the measured read bandwidth "
          f"({read_bw:.1f} GB/s); ceiling {read_bw * 1e9 / weight_bytes:.2f} tokens/s")


if __name__ == "__main__":
    main()
