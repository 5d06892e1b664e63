"""Serving benchmark: N concurrent streaming clients against the real server (python launch.py --api).

For each model (a TinyLlama-1.1B-shaped model with random weights, ``--layers`` of its 22 layers; the shipped
demo model ``models/LLM/atelier-tiny-chat``) it measures, on the same random requests (random prompt and output
lengths, some sharing a prefix):

* the paged engine (``llm.engine: paged``) and the engine it replaced (``llm.engine: contiguous``) behind the
  server: total output tokens/s, time to first token (TTFT) and inter-token latency (ITL), p50 / p99;
* transformers' static batching of the same requests (``generate`` on the same weights, left padding, batches
  of N in arrival order), in this process: output tokens/s;
* the paged engine on the same requests in this process (no HTTP, no load generator sharing the two cores), at
  batch 1 and N: what the engine itself does, comparable with the in-process transformers figure;
* the goals: at 32 clients, throughput >= 8x the paged engine's own batch-1 rate and >= 1.5x transformers;
  with a shared 1,000-token system prompt (TinyLlama shape only: the demo model's context is 256), TTFT >= 5x
  faster with ``llm.prefix_caching`` on than off.

    python benchmarks/serving.py --quick            # a few minutes on 2 cores
    python benchmarks/serving.py --layers 22        # the full 1.1B shape (slow on a CPU)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

#: TinyLlama-1.1B's shape, except the vocabulary: the fixture's SentencePiece trainer cannot make 32,000 pieces
#: from its small corpus, so the random model gets 1,536 (its lm_head is 3M instead of 65M of the 1.1B weights)
TINYLLAMA = dict(vocab_size=1536, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)


@dataclass
class Req:
    prompt: list[int]
    max_tokens: int


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def make_requests(n: int, vocab: int, rng: random.Random, *, prompt_range, out_range, shared: int,
                  ctx: int) -> list[Req]:
    """Random prompts (BOS + random ids); every third shares a *shared*-token prefix. Prompt + max_tokens stay
    within the context *ctx* (the server answers 400 otherwise, as OpenAI does)."""
    prefix = [rng.randrange(300, vocab) for _ in range(shared)]
    out = []
    for i in range(n):
        body = [rng.randrange(300, vocab) for _ in range(rng.randint(*prompt_range))]
        prompt = [1] + (prefix if i % 3 == 0 else []) + body
        out.append(Req(prompt, min(rng.randint(*out_range), ctx - len(prompt))))
    return out


async def one(client, url: str, model: str, req: Req, run: Run) -> None:
    body = {"model": model, "prompt": [req.prompt], "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=None) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if last is None:
                run.ttft.append(now - start)
            else:
                run.itl.append(now - last)
            last = now
    run.tokens += req.max_tokens


async def load(url: str, model: str, reqs: list[Req], clients: int) -> Run:
    """*clients* workers take requests from one queue, each streaming one request at a time."""
    import httpx
    run = Run()
    queue = list(reqs)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            while queue:
                await one(client, url, model, queue.pop(0), run)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        run.seconds = time.perf_counter() - start
    return run


#: the dtype every contender runs in (``--precision``): the server gets the same flag, so no row is bf16 by the
#: ``--precision auto`` rule while transformers runs fp32
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def serve(data: Path, models_dir: Path, settings: dict, precision: str = "fp32"):
    from server_utils import start_server
    (data / "models").mkdir(parents=True, exist_ok=True)
    link = data / "models" / "LLM"
    if not link.exists():
        link.symlink_to(models_dir)
    (data / "settings.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    return start_server(data, "--api", "--nowebui", "--precision", precision, timeout=300)


def warm(url: str, model: str) -> None:
    import httpx
    httpx.post(url + "/v1/completions", json={"model": model, "prompt": [[1, 400, 500]], "max_tokens": 2},
               timeout=600).raise_for_status()


def transformers_static(folder: Path, reqs: list[Req], batch: int, precision: str = "fp32") -> Run:
    """transformers' generate on the same weights: static batches of *batch* requests, left-padded, every row
    decoding until the batch's longest output (the useful tokens are counted)."""
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, DTYPES[precision])).eval()
    run = Run()
    start = time.perf_counter()
    for i in range(0, len(reqs), batch):
        group = reqs[i:i + batch]
        width = max(len(r.prompt) for r in group)
        ids = torch.full((len(group), width), 2, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for j, r in enumerate(group):
            ids[j, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[j, width - len(r.prompt):] = 1
        new = max(r.max_tokens for r in group)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=2)
        run.ttft.extend([time.perf_counter() - t0] * len(group))   # a static batch streams nothing before the end
        run.tokens += sum(r.max_tokens for r in group)
    run.seconds = time.perf_counter() - start
    return run


def engine_in_process(folder: Path, reqs: list[Req], max_batch: int, *, paged: bool, precision: str = "fp32") -> Run:
    """Atelier's engine on the same requests in this process, with no HTTP in between: all requests queued at
    once, *max_batch* decoding together (rows join as others finish). Separates what the engine does from what
    the server's streaming costs on the same two cores (the load generator, SSE, the event loop)."""
    import torch
    from modules.llm.engine import GenerationRequest, generate
    from modules.llm.loader import load_llm
    from modules.llm.paged.kv_memory import new_pool, pool_blocks
    from modules.llm.paged.paged_engine import generate_paged
    from modules.llm.sampling import SamplingParams
    llm = load_llm(folder, dtype=getattr(torch, DTYPES[precision]))
    requests = [GenerationRequest(list(r.prompt), SamplingParams(temperature=0, max_new_tokens=r.max_tokens,
                                                                 ignore_eos=True)) for r in reqs]
    start = time.perf_counter()
    if paged:
        pool = new_pool(llm, pool_blocks(llm, kv_cache_mb=0, max_batch=max_batch, free_bytes=None))
        results = generate_paged(llm, pool, requests, max_batch=max_batch)
    elif max_batch == 1:
        results = [r for req in requests for r in generate(llm, [req])]
    else:  # the contiguous loop takes newcomers only from a job queue: static groups of max_batch here
        results = [r for i in range(0, len(requests), max_batch)
                   for r in generate(llm, requests[i:i + max_batch], max_batch=max_batch)]
    # no TTFT/ITL: every request is queued at the start, so waiting would count as latency
    return Run(tokens=sum(r.completion_tokens for r in results), seconds=time.perf_counter() - start)


def row(label: str, run: Run) -> str:
    ms = lambda v: f"{1000 * v:8.0f}"
    return (f"{label:<34} {run.tokens:>7} {run.rate:>9.1f} {ms(pct(run.ttft, .5))} {ms(pct(run.ttft, .99))} "
            f"{ms(pct(run.itl, .5)) if run.itl else '       -'} {ms(pct(run.itl, .99)) if run.itl else '       -'}")


HEADER = f"{'case':<34} {'tokens':>7} {'tok/s':>9} {'TTFT p50':>8} {'TTFT p99':>8} {'ITL p50':>8} {'ITL p99':>8}"


def bench_model(name: str, folder: Path, models_dir: Path, work: Path, args, *, vocab: int, ctx: int,
                prefix_goal: bool) -> list[str]:
    rng = random.Random(0)
    n_clients = args.clients
    prompt_range = (16, 96) if args.quick else (32, 512)
    prompt_range = (prompt_range[0], min(prompt_range[1], ctx // 3))
    out_range = (8, 32) if args.quick else (32, 256)
    shared = min(64, ctx // 8)
    reqs = make_requests(args.requests or 2 * n_clients, vocab, rng, prompt_range=prompt_range,
                         out_range=out_range, shared=shared, ctx=ctx)
    singles = reqs[:args.single_requests]
    lines, goals = [], []
    results: dict[str, Run] = {}
    base = {"llm.max_batch": max(32, n_clients), "llm.weight_quantization": "none"}
    for engine in ("paged", "contiguous"):
        srv = serve(work / f"{name}-{engine}", models_dir, {**base, "llm.engine": engine}, args.precision)
        try:
            warm(srv.url, name)
            if engine == "paged":
                results["paged batch-1"] = asyncio.run(load(srv.url, name, singles, 1))
            results[f"{engine} {n_clients} clients"] = asyncio.run(load(srv.url, name, reqs, n_clients))
        finally:
            srv.stop()
    results[f"transformers static {n_clients}"] = transformers_static(folder, reqs, n_clients, args.precision)
    results["in-process paged batch-1"] = engine_in_process(folder, singles, 1, paged=True,
                                                          precision=args.precision)
    results[f"in-process paged {n_clients}"] = engine_in_process(folder, reqs, n_clients, paged=True,
                                                                   precision=args.precision)
    for label, run in results.items():
        lines.append(row(f"{name}: {label}", run))
    paged, single = results[f"paged {n_clients} clients"], results["paged batch-1"]
    static = results[f"transformers static {n_clients}"]
    goals.append(f"{name}: {n_clients} clients vs own batch-1: {paged.rate / single.rate:.2f}x (goal >= 8x)")
    goals.append(f"{name}: {n_clients} clients vs transformers static: {paged.rate / static.rate:.2f}x (goal >= 1.5x)")
    inproc, inproc1 = results[f"in-process paged {n_clients}"], results["in-process paged batch-1"]
    goals.append(f"{name}: in-process engine, {n_clients} vs batch-1: {inproc.rate / inproc1.rate:.2f}x (goal >= 8x)")
    goals.append(f"{name}: in-process engine vs transformers static: {inproc.rate / static.rate:.2f}x "
                 "(goal >= 1.5x; both without HTTP)")
    goals.append(f"{name}: paged vs contiguous engine: "
                 f"{paged.rate / results[f'contiguous {n_clients} clients'].rate:.2f}x (no goal)")
    if prefix_goal:
        system = [rng.randrange(300, vocab) for _ in range(1000)]
        prefixed = [Req([1] + system + [rng.randrange(300, vocab) for _ in range(12)], 1)
                    for _ in range(args.prefix_requests)]
        ttft = {}
        for caching in (True, False):
            srv = serve(work / f"{name}-prefix-{caching}", models_dir, {**base, "llm.prefix_caching": caching},
                        args.precision)
            try:
                warm(srv.url, name)
                asyncio.run(load(srv.url, name, prefixed[:1], 1))       # the first request fills the cache
                run = asyncio.run(load(srv.url, name, prefixed[1:], 1))
                ttft[caching] = statistics.median(run.ttft)
                lines.append(row(f"{name}: 1000-token prefix, caching {'on' if caching else 'off'}", run))
            finally:
                srv.stop()
        goals.append(f"{name}: TTFT with a shared 1000-token prompt, caching off / on: "
                     f"{ttft[False] / ttft[True]:.2f}x (goal >= 5x)")
    return lines + ["GOALS " + g for g in goals]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short prompts and outputs, 2 TinyLlama layers")
    ap.add_argument("--layers", type=int, default=None, help="TinyLlama-shape layers (default 22, quick 2)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--precision", choices=sorted(DTYPES), default="fp32",
                    help="dtype of every contender (server, in-process engine, transformers)")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default 2 x clients)")
    ap.add_argument("--single-requests", type=int, default=4, help="requests of the batch-1 run")
    ap.add_argument("--prefix-requests", type=int, default=5)
    ap.add_argument("--models", default="tinyllama,demo", help="comma list: tinyllama, demo")
    args = ap.parse_args()
    layers = args.layers or (2 if args.quick else 22)
    work = Path(tempfile.mkdtemp(prefix="atelier-serving-"))
    out = [HEADER]
    if "tinyllama" in args.models:
        from modules.fixtures.llm import write_model
        models_dir = work / "tiny-models"
        folder = write_model(models_dir / "tinyllama-shape", dict(TINYLLAMA, num_hidden_layers=layers))
        out += bench_model("tinyllama-shape", folder, models_dir, work, args, vocab=TINYLLAMA["vocab_size"], ctx=2048,
                           prefix_goal=True)
    if "demo" in args.models:
        models_dir = REPO / "models" / "LLM"
        out += bench_model("atelier-tiny-chat", models_dir / "atelier-tiny-chat", models_dir, work, args,
                           vocab=4096, ctx=256, prefix_goal=False)
    print(f"\nserving benchmark (TinyLlama shape with {layers} layers; {args.precision}; {args.clients} clients)")
    print("\n".join(line for line in out if not line.startswith("GOALS ")))
    print("\ngoals (measured / goal):")
    print("\n".join(line[6:] for line in out if line.startswith("GOALS ")))


if __name__ == "__main__":
    main()
