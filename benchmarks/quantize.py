"""GGUF through bare llama-cpp-python and through Atelier's llama.cpp backend, and Atelier's own engine in fp32,
bf16, int8 and int4: size, batch-1 decode and prefill on the TinyLlama-1.1B shape, perplexity on the demo model.

    python benchmarks/quantize.py                # 22 layers: ~12 GB of RAM and ~10 GB of disk, ~10 minutes
    python benchmarks/quantize.py --layers 2     # quick check of the script itself

One process, one run, side by side:

* the model: TinyLlama-1.1B-shaped, random weights (std 0.02, seed 0, ``benchmarks/llm_decode.py``), a synthetic
  32,000-piece Llama vocabulary. Its GGUF files are written once into ``--work`` (F32 and F16 by Atelier's
  exporter, Q8_0 / Q4_K_M / Q4_0 by llama.cpp's quantizer from the F16) and reused by later runs;
* **(a) bare llama-cpp-python**: its C API only (``llama_decode`` on one token, the last logits, NumPy argmax),
  the fastest anything built on it can be;
* **(b) Atelier's llama.cpp backend** through its engine path (:func:`modules.llm.llamacpp_backend.generate_llamacpp`:
  Atelier's sampler, stop-string and streaming logic on every token), greedy, EOS ignored;
* **(c) Atelier's own engine** (:func:`modules.llm.engine.generate`) where it runs the format: fp32 for F32,
  bf16 for F16 (the 16-bit format this CPU computes in), its int8 and int4-g32 weights
  (:mod:`modules.quantize.torch_weights`);
* decode rate = (n - 1) / (time of the last token - time of the first); prefill = prompt tokens / time of
  one forward over them. Formats are measured back to back in rounds, medians reported, (b)/(a) taken
  within a round;
* perplexity: the shipped ``atelier-tiny-chat`` through the quantize report (:mod:`modules.quantize.report`):
  answer perplexity on held-out chats for each format, its change against Atelier's fp32 model.

Both llama.cpp sides load models with the same buffers (:func:`modules.llm.llamacpp_runtime.extra_buffers_work`:
on a CPU with AMX inside a VM that does not grant it, the AMX / repacked buffers crash, so both use plain CPU
buffers there; the header line says which). The issue's goals are printed at the end: (b) within 5 % of (a);
Atelier int8 decode >= 1.7x its fp32, int4 >= 2.5x; Q4_K_M perplexity within 5 % of F16.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_decode import _Stamps, build_models, memory_bandwidth, ours_decode, prefill_rate  # noqa: E402
from quantize_torch import resident_bytes, variant  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "LLM" / "atelier-tiny-chat"
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_K_M", "Q4_0")
#: GGUF type -> the Atelier engine row that runs the same weights (None: Atelier's engine only dequantizes it)
ATELIER_ROWS = {"F32": "fp32", "F16": "bf16", "Q8_0": None, "Q4_K_M": None, "Q4_0": None}
TORCH_ROWS = {"fp32": (None, torch.float32), "bf16": (None, torch.bfloat16), "int8": ("int8", torch.float32),
              "int4-g32": ("int4-g32", torch.float32)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B)")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per measurement")
    p.add_argument("--prefill", type=int, default=256, help="prompt length of the prefill measurement")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "atelier-bench-quantize",
                   help="where the GGUF files are written and kept between runs")
    p.add_argument("--skip-demo", action="store_true", help="leave out the demo model's perplexity")
    return p.parse_args()


# ------------------------------------------------------------------------------------------- the files
def synthetic_tokenizer(vocab: int):
    """A Llama-layout SentencePiece vocabulary: <unk> <s> </s>, 256 byte pieces, then "▁w{i}" words."""
    from modules.quantize.tokenizer_to_gguf import BYTE, CONTROL, NORMAL, UNKNOWN, GGUFTokenizer
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581w{i}" for i in range(vocab - len(tokens))]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (vocab - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(vocab - 259)]
    return GGUFTokenizer(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
                         bos_id=1, eos_id=2, unk_id=0, add_bos=True, add_eos=False)


def write_ggufs(config, model, work: Path, threads: int) -> dict[str, Path]:
    from modules.quantize.gguf_export import write_gguf
    from modules.quantize.gguf_types import gguf_type
    from modules.quantize.llama_quantize import quantize_gguf
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = synthetic_tokenizer(config.vocab_size)
    paths = {t: work / f"tinyllama-shape-{config.num_hidden_layers}l.{t}.gguf" for t in GGUF_TYPES}
    for kind in ("F32", "F16"):
        if not paths[kind].is_file():
            started = time.perf_counter()
            write_gguf(config, model.state_dict().items(), tokenizer, paths[kind], kind, name="tinyllama-shape")
            print(f"  wrote {paths[kind].name} in {time.perf_counter() - started:.0f} s", flush=True)
    for kind in ("Q8_0", "Q4_K_M", "Q4_0"):
        if not paths[kind].is_file():
            started = time.perf_counter()
            partial = paths[kind].with_suffix(".partial")
            quantize_gguf(paths["F16"], partial, gguf_type(kind).ftype, threads=threads)
            partial.replace(paths[kind])
            print(f"  quantized {paths[kind].name} in {time.perf_counter() - started:.0f} s", flush=True)
    return paths


# ------------------------------------------------------------------------------ (a) bare llama-cpp-python
class Bare:
    """A GGUF through llama-cpp-python's C API and nothing else: the reference the backend is compared with."""

    def __init__(self, path: Path, threads: int, n_ctx: int, extra_buffers: bool):
        import logging

        import llama_cpp as lib
        self.lib = lib
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)    # llama.cpp's load log: errors only
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(512, n_ctx)
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, cparams)

    def _decode(self, ids: list[int]) -> np.ndarray:
        lib = self.lib
        tokens = (lib.llama_token * len(ids))(*ids)
        if lib.llama_decode(self.ctx, lib.llama_batch_get_one(tokens, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def decode_rate(self, prompt: list[int], new_tokens: int) -> float:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        logits, times = self._decode(prompt), []
        for _ in range(new_tokens):
            token = int(logits.argmax())
            times.append(time.perf_counter())
            logits = self._decode([token])
        return (len(times) - 1) / (times[-1] - times[0])

    def prefill(self, ids: list[int]) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self._decode(ids)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


# --------------------------------------------------------------------------- (b) Atelier's llama.cpp backend
def backend_decode_rate(llm, prompt: list[int], new_tokens: int) -> float:
    from modules.llm.engine import GenerationRequest
    from modules.llm.llamacpp_backend import generate_llamacpp
    from modules.llm.sampling import SamplingParams
    llm.reset()
    stamps = _Stamps()
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True, repetition_penalty=1.0)
    generate_llamacpp(llm, GenerationRequest(list(prompt), params), stamps)
    return stamps.rate()


def demo_perplexity(threads: int, extra_buffers: bool) -> dict[str, float]:
    """Answer perplexity change against fp32 per format, on a copy of the demo model (the report's own files)."""
    from modules.quantize.report import run_report
    with tempfile.TemporaryDirectory() as tmp:
        llm_dir = Path(tmp) / "models" / "LLM"
        shutil.copytree(DEMO, llm_dir / DEMO.name)
        report = run_report(llm_dir, DEMO.name, ["F16", "Q8_0", "Q4_K_M", "Q4_0", "int8", "int4-g32"],
                            threads=threads, max_new_tokens=8, extra_buffers=extra_buffers)
    out = {"F32": report.reference.ppl}
    out.update({row.format: row.ppl for row in report.rows})
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from modules.llm.llamacpp_backend import llama_cpp_report, load_llamacpp
    from modules.llm.llamacpp_runtime import extra_buffers_work
    from modules.llm.loader import read_llm_files
    extra = extra_buffers_work()
    print(f"torch {torch.__version__}; {llama_cpp_report()}; {args.threads} threads; {args.layers} layers; "
          f"llama.cpp buffers: {'extra (AMX / repacked)' if extra else 'plain CPU (extra buffers crash here)'}; "
          f"{args.rounds} rounds of {args.new_tokens} decoded tokens, prefill {args.prefill} (medians)")
    started = time.perf_counter()
    config, base, _ = build_models(args.layers, with_hf=False)
    models = {"fp32": base}
    for name, (scheme, dtype) in TORCH_ROWS.items():
        if name != "fp32":
            models[name] = variant(base, scheme, dtype, lm_head=True)
    print(f"Atelier models built in {time.perf_counter() - started:.0f} s", flush=True)
    paths = write_ggufs(config, base, args.work, args.threads)
    files = read_llm_files(paths["F32"])          # Atelier's tokenizer and config for the synthetic vocabulary

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(259, config.vocab_size, (args.prompt,), generator=gen).tolist()
    long_prompt = torch.randint(259, config.vocab_size, (args.prefill,), generator=gen).tolist()
    n_ctx = max(512, args.prefill + 8, args.prompt + args.new_tokens + 8)

    bare_rate = {t: [] for t in GGUF_TYPES}
    backend_rate = {t: [] for t in GGUF_TYPES}
    ratio = {t: [] for t in GGUF_TYPES}
    atelier_rate = {n: [] for n in models}
    bare_prefill, backend_prefill, atelier_prefill = {}, {}, {}
    bandwidth = []
    for r in range(args.rounds):
        bandwidth.append(memory_bandwidth(1.0))
        for kind in GGUF_TYPES:
            bare = Bare(paths[kind], args.threads, n_ctx, extra)
            bare.decode_rate(prompt, 4)                                                # warm-up
            bare_rate[kind].append(bare.decode_rate(prompt, args.new_tokens))
            if r == 0:
                bare_prefill[kind] = prefill_rate(lambda n, b=bare: b.prefill(long_prompt[:n]), args.prefill)
            bare.close()
            llm = load_llamacpp(paths[kind], files, threads=args.threads, extra_buffers=extra, n_ctx=n_ctx)
            backend_decode_rate(llm, prompt, 4)
            backend_rate[kind].append(backend_decode_rate(llm, prompt, args.new_tokens))
            if r == 0:
                def prefill(n: int, llm=llm) -> None:
                    llm.reset()
                    llm.prefill(long_prompt[:n])
                backend_prefill[kind] = prefill_rate(prefill, args.prefill)
            llm.close()
            ratio[kind].append(backend_rate[kind][-1] / bare_rate[kind][-1])
        for name, model in models.items():
            if r == 0:
                ours_decode(config, model, [prompt], 4)
            atelier_rate[name].append(ours_decode(config, model, [prompt], args.new_tokens)[0])
            if r == 0:
                def run(n: int, model=model) -> None:
                    with torch.inference_mode():
                        model(torch.tensor([long_prompt[:n]]), cache=model.new_kv_cache(1, n), last_only=True)
                atelier_prefill[name] = prefill_rate(run, args.prefill)
        print(f"  round {r + 1}: read BW {bandwidth[-1]:.1f} GB/s; bare/backend "
              + ", ".join(f"{k} {bare_rate[k][-1]:.1f}/{backend_rate[k][-1]:.1f}" for k in GGUF_TYPES)
              + "; Atelier " + ", ".join(f"{n} {atelier_rate[n][-1]:.2f}" for n in models) + " tok/s", flush=True)

    ppl = {} if args.skip_demo else demo_perplexity(args.threads, extra)
    med = statistics.median
    print(f"\nread bandwidth median {med(bandwidth):.1f} GB/s; {time.perf_counter() - started:.0f} s in all\n")
    header = ("| format | size MB | (a) bare decode | (b) backend decode | (b)/(a) | (c) Atelier decode | (c) vs fp32 "
              "| (a) prefill | (b) prefill | (c) prefill | demo ppl change vs F32 |")
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    fp32 = med(atelier_rate["fp32"])

    def ppl_cell(kind: str) -> str:
        return f"{100 * (ppl[kind] / ppl['F32'] - 1):+.2f}%" if kind in ppl else ""

    for kind in GGUF_TYPES:
        row = ATELIER_ROWS[kind]
        ours = (f"{med(atelier_rate[row]):.2f} ({row}) | {med(atelier_rate[row]) / fp32:.2f}x", 
                f"{atelier_prefill[row]:.1f}") if row else ("- | -", "-")
        print(f"| {kind} | {paths[kind].stat().st_size / 2**20:.0f} | {med(bare_rate[kind]):.2f} | "
              f"{med(backend_rate[kind]):.2f} | {med(ratio[kind]):.3f} | {ours[0]} | {bare_prefill[kind]:.1f} | "
              f"{backend_prefill[kind]:.1f} | {ours[1]} | {ppl_cell(kind)} |")
    for name in ("int8", "int4-g32"):
        print(f"| Atelier {name} | {resident_bytes(models[name]) / 2**20:.0f} (resident) | - | - | - | "
              f"{med(atelier_rate[name]):.2f} | {med(atelier_rate[name]) / fp32:.2f}x | - | - | "
              f"{atelier_prefill[name]:.1f} | {ppl_cell(name)} |")
    print()
    for kind in GGUF_TYPES:
        got = med(ratio[kind])
        print(f"goal (b) within 5% of (a), {kind}: {'met' if got >= 0.95 else 'MISSED'} ({got:.3f}; rounds "
              f"{', '.join(f'{x:.3f}' for x in ratio[kind])})")
    for name, goal in (("int8", 1.7), ("int4-g32", 2.5)):
        got = [a / b for a, b in zip(atelier_rate[name], atelier_rate["fp32"])]
        print(f"goal Atelier {name} decode >= {goal}x fp32: {'met' if med(got) >= goal else 'MISSED'} "
              f"({med(got):.2f}x; rounds {', '.join(f'{x:.2f}' for x in got)})")
    if ppl:
        change = ppl["Q4_K_M"] / ppl["F16"] - 1
        print(f"goal Q4_K_M perplexity within 5% of F16 (demo model): {'met' if abs(change) <= 0.05 else 'MISSED'} "
              f"({100 * change:+.2f}%)")


if __name__ == "__main__":
    main()
