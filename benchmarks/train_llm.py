"""Training throughput and MFU of Atelier's pretraining step against a plain transformers loop.

    python benchmarks/train_llm.py                                   # ~100M shape, CPU, fp32 + bf16, ~3 min
    python benchmarks/train_llm.py --rounds 4 --steps 2              # steadier figures, ~10 min
    python benchmarks/train_llm.py --shape tinyllama-1.1b --device cuda --batch 8 --seq-len 2048 \\
        --precisions bf16                                            # on a GPU
    python benchmarks/train_llm.py --profile                         # + torch.profiler table of one step

What is measured (a script that prints a table, never a timed test):

* **Atelier**: the real :class:`modules.training.llm.pretrain.Pretrainer` built from a
  :class:`~modules.training.config.PretrainConfig` (precision fp32 or bf16), stepping with its own
  ``_optimizer_step`` - the exact code ``python -m modules.training pretrain`` runs per optimizer step
  (autocast, loss, backward, gradient clipping, the NaN check, fused AdamW, ``zero_grad``), not a copy.
  Data is random token ids through an object with the training-data protocol (the step does not care
  what the tokens mean; reading a memory-mapped shard costs microseconds next to a step).
* **Atelier compiled**: the same trainer with ``compile=true`` (``torch.compile``'d decoder blocks and
  loss; same initial weights and batches), timed after its first step has compiled (``--no-compile``: skip).
* **transformers**: ``LlamaForCausalLM`` (SDPA attention) with the same weights (copied from Atelier's
  initialisation), shape, batch, sequence length and dtype, trained by the loop a user would write:
  ``torch.autocast`` around the forward, fp32 cross-entropy, ``backward``, ``clip_grad_norm_(1.0)``,
  ``torch.optim.AdamW`` with its defaults for the device (betas/weight decay as Atelier's), ``zero_grad``.
* **Peak**: on a CPU the matmul peak of :func:`modules.training.llm.mfu.peak_flops` - the same
  measurement the trainer makes at start-up - taken again at the start of every round in fp32 and bf16;
  on CUDA the datasheet table of the same module. Each CPU round also prints a 2048^3 bf16 matmul (the
  1024^3 one the trainer uses under-reads AMX hosts) and a cast probe that shows how busy the host is. MFU uses FLOPs per token = 6 N + 12 L d T with N the
  parameters without the input embedding (``mfu.flops_per_token``, Atelier's logged convention).
* **Rounds**: the host is shared and its speed drifts, so the two implementations alternate in
  ABBA order (round 1 Atelier then transformers, round 2 transformers then Atelier, ...) after one
  untimed warm-up step each; ratios are taken within a round and medians reported (as
  benchmarks/llm_decode.py does). A step's rate = tokens of the step / its wall time (synchronised on CUDA).

Shapes: ``llama-100m`` (defined here, a Llama-2-style GQA shape of about 100M parameters - 124.7M in
all, 100.1M without the input embedding: vocab 32000, d 768, 12 layers, 12 query / 4 key-value heads of
64, SwiGLU 2048, untied head) and any preset of :data:`modules.llm.config.PRESETS` (``tinyllama-1.1b``).

Measured 2026-12-03 on the 2-vCPU development host (then an AMD EPYC), ``--precisions bf16 --rounds 3 --steps 2``,
host quiet (load 1.1 -> 1.5), 63 s:

    | implementation   | dtype | tokens/s | GFLOP/s | peak GFLOP/s | MFU   | vs transformers |
    | Atelier          | bf16  |    474.8 |   298.6 |  842 (bf16)  | 39.1% | 1.33x           |
    | Atelier compiled | bf16  |    776.7 |   488.4 |  842 (bf16)  | 58.5% | 1.92x           |
    | transformers     | bf16  |    403.9 |   254.0 |  842 (bf16)  | 29.8% | 1.00x           |

A second run that day (``--precisions fp32,bf16``) gave bf16 compiled 55.6% MFU (684.9 tok/s, 1.77x eager) and fp32
compiled 85.1% of the fp32 peak (266.3 tok/s, 1.17x eager); eager-vs-transformers ratios swing 0.85-1.55 between
rounds on this host, which is why the rounds interleave.

Measured 2026-12-01 on the 2-vCPU development host, which was then an Intel Xeon (Sapphire Rapids, AVX-512
BF16 + AMX; not the Zen 4 of cpu-baselines.md), torch 2.13.0+cpu, transformers 5.24.0, default settings
(batch 4 x 256, 2 rounds x 1 step), host quiet (cast probe 0.08 ms, load 2.7 -> 2.4), 34 s in all:

    | implementation | dtype | tokens/s | GFLOP/s | peak GFLOP/s | MFU   | vs transformers |
    | Atelier        | fp32  |    387.9 |   243.9 |  349 (fp32)  | 69.9% | 1.11x           |
    | transformers   | fp32  |    349.6 |   219.8 |  349 (fp32)  | 63.1% | 1.00x           |
    | Atelier        | bf16  |    755.8 |   475.3 | 1332 (bf16)  | 35.7% | 1.26x           |
    | transformers   | bf16  |    602.1 |   378.6 | 1332 (bf16)  | 28.5% | 1.00x           |

The same run's 2048^3 bf16 matmul reached 2286 GFLOP/s (Atelier bf16 = 20.8% of it). In a bf16 step the
matmuls take ~37% of the time at ~1.2 TFLOP/s (torch.profiler, ``--profile``); dtype casts of autocast
(~15%), elementwise ops of RMSNorm/RoPE/SwiGLU, the flash-attention backward, fused AdamW, gradient clipping
and the fp32 log-softmax over 32000 logits make up the rest. While other processes kept the two cores busy
(load ~5, cast probe 2-7 ms) the same script measured 4-7x less for both implementations: every OpenMP
barrier of a small op then waits for a descheduled thread - ``--threads 1`` is faster in such periods.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.llm.config import PRESETS, LlamaConfig
from modules.training.config import PretrainConfig
from modules.training.llm import mfu as mfu_lib
from modules.training.llm.pretrain import Pretrainer
from modules.training.run_dir import create_run_dir

#: the ~100M-parameter shape of the CPU benchmark (see the module docstring)
LLAMA_100M = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-100m", choices=["llama-100m", *sorted(PRESETS)],
                   help="model shape (llama-100m: defined in this script; others: modules.llm.config.PRESETS)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (quick checks)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--batch", type=int, default=4, help="micro-batch (sequences per forward)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=1, help="timed optimizer steps per implementation per round")
    p.add_argument("--rounds", type=int, default=2, help="ABBA-interleaved rounds per precision")
    p.add_argument("--skip-hf", action="store_true", help="measure Atelier only")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compile=true Atelier trainer (its first step compiles for about a minute)")
    p.add_argument("--profile", action="store_true",
                   help="after the rounds, profile one Atelier step per precision with torch.profiler")
    return p.parse_args()


# ------------------------------------------------------------------------------------------- pieces
class RandomTokens:
    """The training-data protocol over seeded random token ids (two instances with one seed agree)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0

    def next_batch(self, batch_size: int) -> torch.Tensor:
        self.position += batch_size
        return torch.randint(3, self.vocab_size, (batch_size, self.seq_len + 1), generator=self.generator)

    def val_batches(self, batch_size: int):
        return iter(())

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def model_overrides(args: argparse.Namespace) -> tuple[str, dict]:
    """(preset name, LlamaConfig overrides) for PretrainConfig."""
    if args.shape == "llama-100m":
        preset, model = "tinyllama-1.1b", dict(LLAMA_100M)
    else:
        preset, model = args.shape, {}
    if args.layers:
        model["num_hidden_layers"] = args.layers
    return preset, model


def build_atelier(args, precision: str, workdir: Path, compile: bool = False) -> Pretrainer:
    preset, model = model_overrides(args)
    tokens = args.batch * args.seq_len * args.accum
    config = PretrainConfig(model_preset=preset, model=model, data="(random tokens)", seq_len=args.seq_len,
                            micro_batch=args.batch, global_batch_tokens=tokens, max_steps=10 ** 6,
                            warmup_steps=0, precision=precision, device=args.device, eval_every=0,
                            compile=compile, run_name=f"bench-{precision}{'-compiled' if compile else ''}")
    problems = config.problems()
    if problems:
        raise SystemExit("benchmark config is invalid: " + "; ".join(problems))
    run = create_run_dir(workdir, config.run_name, config.to_dict())
    return Pretrainer(config, RandomTokens(config.model_config().vocab_size, args.seq_len), run)


class TransformersLoop:
    """The plain loop: LlamaForCausalLM + torch.optim.AdamW, same weights, recipe and dtype as Atelier's."""

    def __init__(self, trainer: Pretrainer, args):
        import transformers

        config: LlamaConfig = trainer.model_config
        hf_config = transformers.LlamaConfig(**config.to_hf_dict())
        hf_config._attn_implementation = "sdpa"
        self.device = trainer.device
        self.model = transformers.LlamaForCausalLM(hf_config)
        self.model.load_state_dict(trainer.model.state_dict(), strict=True)
        self.model.to(self.device).train()
        pc = trainer.config
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=pc.lr, betas=tuple(pc.betas),
                                           weight_decay=pc.weight_decay)
        self.autocast_dtype = trainer.autocast_dtype
        self.data = RandomTokens(config.vocab_size, args.seq_len)
        self.batch, self.accum, self.clip = args.batch, args.accum, pc.grad_clip

    def step(self) -> float:
        loss_sum = 0.0
        for _ in range(self.accum):
            batch = self.data.next_batch(self.batch).to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                logits = self.model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            (loss / self.accum).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(step, steps: int, tokens_per_step: int, device: torch.device) -> tuple[float, float]:
    """(tokens/s over ``steps`` optimizer steps, loss of the last step)."""
    sync(device)
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        loss = step()
    sync(device)
    return steps * tokens_per_step / (time.perf_counter() - start), loss


def small_op_ms(threads: int, repeats: int = 50) -> float:
    """Median ms of one fp32->bf16 cast of a (1024, 768) activation with ``threads`` threads: a probe of how
    busy the shared host is (an idle 2-core host takes ~0.2 ms; while other processes hold the cores, every
    OpenMP barrier waits for a descheduled thread and small ops take 10-40x longer)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(1024, 768)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.to(torch.bfloat16)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(previous)
    return 1e3 * statistics.median(times)


def peaks(device: torch.device) -> dict[str, float | None]:
    """fp32 and bf16 peak FLOP/s, as the trainer gets them (measured on CPU, the table on CUDA)."""
    return {name: mfu_lib.peak_flops(device, dtype)[0]
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def profile_step(trainer: Pretrainer, precision: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer._optimizer_step()
        sync(trainer.device)
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(f"\ntorch.profiler, one Atelier {precision} step (top 20 by self time):")
    print(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=48))


# ---------------------------------------------------------------------------------------------- main
def run_precision(args, precision: str, workdir: Path) -> dict:
    device = torch.device(args.device)
    trainer = build_atelier(args, precision, workdir)
    compiled = None if args.no_compile else build_atelier(args, precision, workdir, compile=True)
    hf = None if args.skip_hf else TransformersLoop(trainer, args)
    tokens = args.batch * args.seq_len * args.accum
    config = trainer.model_config
    flops_token = mfu_lib.flops_per_token(config, args.seq_len)
    steps = {"ours": lambda: trainer._optimizer_step()[0]}
    if compiled is not None:
        steps["compiled"] = lambda: compiled._optimizer_step()[0]
    if hf is not None:
        steps["hf"] = hf.step

    first = {}
    for who, step in steps.items():                          # warm-ups: allocator, optimizer state, kernels,
        started = time.perf_counter()                        # and the compiled trainer's compilation
        first[who] = step()
        sync(device)
        if who == "compiled":
            first["compile_s"] = time.perf_counter() - started
    r: dict[str, list[float]] = {}
    for i in range(args.rounds):
        pk = peaks(device)
        for name, value in pk.items():
            r.setdefault(f"peak_{name}", []).append(value or math.nan)
        if device.type == "cpu":
            big = mfu_lib.measure_matmul_peak(torch.bfloat16, device, size=2048)
            r.setdefault("peak_bf16_2048", []).append(big)
            probe = f"; cast probe {small_op_ms(torch.get_num_threads()):.2f} ms ({small_op_ms(1):.2f} ms on 1 thread)"
        else:
            big, probe = None, ""
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for who in order:
            rate, _ = timed_rate(steps[who], args.steps, tokens, device)
            r.setdefault(who, []).append(rate)
        peak = pk[precision]
        line = f"  {precision} round {i + 1} ({'/'.join(order)}): peak fp32 {_g(pk['fp32'])}, bf16 {_g(pk['bf16'])}" \
               f" (2048^3: {_g(big)}) GFLOP/s{probe};"
        for who in (w for w in ("ours", "compiled") if w in steps):
            prefix = "" if who == "ours" else "compiled_"
            line += f" Atelier{' compiled' if who == 'compiled' else ''} {r[who][-1]:.1f} tok/s"
            if peak:
                r.setdefault(f"{prefix}mfu", []).append(r[who][-1] * flops_token / peak)
                r.setdefault(f"{prefix}mfu_bf16", []).append(r[who][-1] * flops_token / pk["bf16"])
                line += f" (MFU {r[f'{prefix}mfu'][-1]:.1%})"
            if hf is not None:
                r.setdefault(f"{prefix}ratio", []).append(r[who][-1] / r["hf"][-1])
            line += ","
        if hf is not None:
            if peak:
                r.setdefault("hf_mfu", []).append(r["hf"][-1] * flops_token / peak)
                r.setdefault("hf_mfu_bf16", []).append(r["hf"][-1] * flops_token / pk["bf16"])
            line += f" transformers {r['hf'][-1]:.1f} tok/s, ratio {r['ratio'][-1]:.2f}x"
        print(line.rstrip(","), flush=True)
    if args.profile:
        profile_step(trainer, precision)
        if compiled is not None:
            profile_step(compiled, precision + " compiled")
    out = {key: statistics.median(values) for key, values in r.items()}
    out.update(rounds=r, first_loss_ours=first["ours"], first_loss_hf=first.get("hf"),
               first_loss_compiled=first.get("compiled"), compile_s=first.get("compile_s"),
               optimizer=trainer.optimizer_kind, flops_token=flops_token, hf_optimizer=_hf_optimizer_kind(hf))
    trainer = compiled = hf = steps = None                    # free the models before the next precision
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _hf_optimizer_kind(hf) -> str:
    if hf is None:
        return "-"
    defaults = hf.optimizer.defaults
    return "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "default"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                amx = " (AMX)" if "amx_bf16" in Path("/proc/cpuinfo").read_text() else ""
                return line.split(":", 1)[1].strip() + amx
    except OSError:
        pass
    return "(unknown)"


def _g(flops: float | None) -> str:
    return "n/a" if not flops or math.isnan(flops) else f"{flops / 1e9:.0f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1%}"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in ("fp32", "bf16")]
    if bad:
        raise SystemExit(f"--precisions takes fp32 and/or bf16, got {bad}")
    preset, model = model_overrides(args)
    config = LlamaConfig.from_name(preset, **model)
    n_all = config.num_parameters()
    n = mfu_lib.non_embedding_parameters(config)
    flops_token = mfu_lib.flops_per_token(config, args.seq_len)
    import transformers
    where = f"{args.threads} threads, CPU {cpu_name()}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}")
    print(f"shape {args.shape}{f' ({args.layers} layers)' if args.layers else ''}: {n_all / 1e6:.1f}M parameters, "
          f"{n / 1e6:.1f}M without the input embedding (d {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads, MLP {config.intermediate_size}, "
          f"vocab {config.vocab_size})")
    print(f"batch {args.batch} x seq {args.seq_len} x accum {args.accum} = "
          f"{args.batch * args.seq_len * args.accum} tokens per optimizer step; {flops_token / 1e9:.3f} GFLOP "
          f"per token (6N + 12LdT); {args.rounds} ABBA rounds x {args.steps} step(s), medians reported")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"load average at start: {' '.join(load)}", flush=True)

    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="atelier-train-bench-") as workdir:
        for precision in precisions:
            results[precision] = run_precision(args, precision, Path(workdir))
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"\nfinished in {time.perf_counter() - started:.0f} s; load average at end: {' '.join(load)}\n")

    print(f"| {'implementation':16} | {'dtype':5} | {'optimizer':9} | {'tokens/s':>9} | {'GFLOP/s':>8} | "
          f"{'peak GFLOP/s':>12} | {'MFU':>6} | {'MFU/bf16 peak':>13} | {'vs transformers':>15} |")
    print(f"|{'-' * 18}|{'-' * 7}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 8}|{'-' * 15}|{'-' * 17}|")
    for precision, m in results.items():
        peak = m.get(f"peak_{precision}")
        rows = [("Atelier", m["optimizer"], m["ours"], m.get("mfu"), m.get("mfu_bf16"), m.get("ratio"))]
        if "compiled" in m:
            rows.append(("Atelier compiled", m["optimizer"], m["compiled"], m.get("compiled_mfu"),
                         m.get("compiled_mfu_bf16"), m.get("compiled_ratio")))
        if "hf" in m:
            rows.append(("transformers", m["hf_optimizer"], m["hf"], m.get("hf_mfu"), m.get("hf_mfu_bf16"), 1.0))
        for name, opt, rate, mfu, mfu_bf16, ratio in rows:
            ratio_s = f"{ratio:.2f}x" if ratio is not None else "-"
            print(f"| {name:16} | {precision:5} | {opt[:9]:9} | {rate:9.1f} | {rate * m['flops_token'] / 1e9:8.1f} | "
                  f"{_g(peak):>12} | {_pct(mfu):>6} | {_pct(mfu_bf16):>13} | {ratio_s:>15} |")
    print()
    for precision, m in results.items():
        if m["first_loss_hf"] is not None:
            print(f"{precision}: first-step loss Atelier {m['first_loss_ours']:.5f}, transformers "
                  f"{m['first_loss_hf']:.5f} (same weights and batch); per-round Atelier/transformers ratios: "
                  + ", ".join(f"{x:.2f}" for x in m["rounds"]["ratio"]))
        if m["first_loss_compiled"] is not None:
            print(f"{precision}: compile=true: first step {m['compile_s']:.0f} s (compilation included), first-step "
                  f"loss {m['first_loss_compiled']:.5f} vs eager {m['first_loss_ours']:.5f}; compiled/eager "
                  f"{m['compiled'] / m['ours']:.2f}x")
        for prefix, label in (("", "Atelier"), ("compiled_", "Atelier compiled")):
            if f"{prefix}mfu_bf16" not in m:
                continue
            mfu, ratio = m[f"{prefix}mfu_bf16"], m.get(f"{prefix}ratio")
            print(f"{precision}: {label} MFU vs the measured bf16 peak {_pct(mfu)} "
                  f"(goal >= 50%: {'met' if mfu >= 0.5 else f'not met, {mfu / 0.5:.2f} of it'})"
                  + (f"; tokens/s vs transformers {ratio:.2f}x (goal >= 1.0x: "
                     f"{'met' if ratio >= 1.0 else 'not met'})" if ratio is not None else ""))
        if "peak_bf16_2048" in m:
            print(f"{precision}: the trainer's peak is a 1024^3 matmul; a 2048^3 bf16 matmul reached "
                  f"{_g(m['peak_bf16_2048'])} GFLOP/s (median), against which Atelier's MFU is "
                  f"{m['ours'] * m['flops_token'] / m['peak_bf16_2048']:.1%}")
    if "default" in {m["hf_optimizer"] for m in results.values()}:
        print("note: transformers' loop uses torch.optim.AdamW with no foreach/fused argument, i.e. torch's "
              "default for the device (the for-loop kernel on CPU, foreach on CUDA)")


if __name__ == "__main__":
    main()
