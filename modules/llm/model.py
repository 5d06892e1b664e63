"""The Llama-2 architecture with grouped-query attention, in plain PyTorch.

Read bottom-up: RMSNorm, rotary embeddings, the KV cache, attention, the SwiGLU MLP, a decoder block,
then :class:`Llama`. Parameter names equal Hugging Face's ``LlamaForCausalLM`` state-dict keys
(``model.layers.0.self_attn.q_proj.weight`` ...), so HF checkpoints load without renaming, and the
maths follows HF's operation order so fp32 logits agree to ~1e-5.

Shapes: B batch, T new tokens, S key slots (cache length after appending), D hidden size,
H query heads, K key/value heads (H = K * groups), hd head size, V vocabulary.

Grouped-query attention (TinyLlama: H=32 query heads, K=4 key/value heads, 8 queries per group)::

    q heads:  q0 q1 .. q7 | q8 .. q15 | ... | q24 .. q31
    kv heads:      k0     |    k1     | ... |     k3

K and V are stored and attended with K heads only; SDPA's ``enable_gqa`` broadcasts each over its group
instead of materialising H copies (8x less KV memory and bandwidth for TinyLlama).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.llm.config import LlamaConfig
from modules.llm.cpu_threading import Linear, RowParallel, project

#: SDPA grew ``enable_gqa`` in torch 2.5 (it is a builtin without an inspectable signature, hence the
#: docstring check); older versions get K/V expanded per group instead.
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as HF does, so bf16 models keep precision)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the "rotate half" layout (dimension i pairs with i + hd/2).

    TinyLlama and HF-converted Llama-2 checkpoints use this layout (Meta's original pairs adjacent
    dimensions; HF's converter permutes q/k rows so this layout gives the same result).
    ``rope_scaling`` linear divides positions by ``factor``; dynamic (NTK) grows theta once the
    sequence exceeds ``max_position_embeddings``, recomputed from the largest position in the call.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.dim = config.head_dim
        self.theta = float(config.rope_theta)
        self.max_positions = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.scaling_type, self.factor = scaling.get("type"), float(scaling.get("factor") or 1.0)

    # inv_freq is recomputed per call (hd/2 numbers, microseconds) rather than kept as a buffer: a buffer
    # would be cast by model.to(bfloat16) and left empty by meta-device construction.
    def _inv_freq(self, theta: float, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (theta ** exponents)                                   # (hd/2,)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, hd) for integer ``positions`` (B, T); angles in fp32."""
        theta = self.theta
        if self.scaling_type == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_positions:
                ratio = self.factor * seq_len / self.max_positions - (self.factor - 1)
                theta = self.theta * ratio ** (self.dim / (self.dim - 2))
        inv_freq = self._inv_freq(theta, positions.device)
        if self.scaling_type == "linear":
            inv_freq = inv_freq / self.factor
        freqs = positions.float()[:, :, None] * inv_freq[None, None, :]        # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                        # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin                                   # (B, heads, T, hd)


class KVCache:
    """Preallocated keys and values for incremental decoding; one slot per token, shared slot count.

    All rows of the batch fill the same slots (``length`` is shared): ragged prompts are left-padded and
    the padding slots are excluded with ``key_mask``. Tensors are plain attributes, not module buffers,
    so they never reach a state dict. Tensors per layer: ``k[i]``/``v[i]`` of shape (B, K, max_len, hd).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        problems = [f"{name} must be a positive integer, got {value!r}" for name, value in
                    (("batch_size", batch_size), ("max_len", max_len)) if not isinstance(value, int) or value < 1]
        if problems:
            raise ValueError("Cannot allocate a KV cache: " + "; ".join(problems))
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def reset(self) -> None:
        """Forget every slot (the memory stays allocated for the next request)."""
        self.length = 0

    def truncate(self, n: int) -> None:
        """Keep slots [0, n): roll back to an earlier point (regenerate, rejected draft tokens)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate(n={n}): n must be between 0 and the cache length {self.length}")
        self.length = n

    def select_rows(self, indices: list[int] | torch.Tensor) -> None:
        """Keep only these batch rows, in this order (drop finished requests from a batch)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.k[0].device)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch_size):
            raise ValueError(f"select_rows({indices!r}): rows must be in [0, {self.batch_size})")
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, hd) at slots [length, length+T); return all filled slots (B, K, S, hd).

        ``length`` itself advances once per forward pass, in :meth:`Llama.forward`, after every layer.
        """
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def memory_bytes(self) -> int:
        from modules.weight_bytes import tensors_bytes
        return tensors_bytes(self.k + self.v)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(d, self.n_head * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_head * self.head_dim, d, bias=bias)
        self.row_parallel: RowParallel | None = None
        self.attention_backend = "sdpa"  # or "xformers" (Llama.use_attention)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj), self.row_parallel)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)                # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                  # (B, K, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)                  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)                                        # (B, K, S, hd)
        y = attend(q, k, v, mask, causal=mask is None and T > 1,
                   backend=self.attention_backend)                                  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)            # (B, T, H*hd)
        return project(y, (self.o_proj,), self.row_parallel)[0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           causal: bool, backend: str = "sdpa") -> torch.Tensor:
    """SDPA over grouped heads: q (B, H, T, hd), k/v (B, K, S, hd), mask (B, 1, T, S) bool or None.
    *backend* "xformers" uses ``xformers.ops.memory_efficient_attention`` instead (``--xformers``)."""
    if backend == "xformers":
        return _xformers_attend(q, k, v, mask, causal)
    if q.shape[2] == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return grouped_decode_attend(q, k, v, mask)
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    B, K, S, hd = k.shape                                  # fallback for torch < 2.5: expand each K/V head
    k = k[:, :, None].expand(B, K, groups, S, hd).reshape(B, K * groups, S, hd)
    v = v[:, :, None].expand(B, K, groups, S, hd).reshape(B, K * groups, S, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def grouped_decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
    """One new token per row (decode), as two batched matmuls with each K/V head's query group stacked:
    q (B, H, 1, hd) -> (B, K, G, hd), scores (B, K, G, S) in fp32, softmax, then @ v.

    Why not SDPA here: on a CPU, PyTorch's bf16 SDPA kernel for a single query is 4-5x slower than this
    (measured with torch 2.13, 32 rows x 700 keys: 48 ms against 9 ms a layer), and decode is where a serving
    engine spends its steps. In fp32, and for several queries (prefill, speculative verification), SDPA is as
    fast or faster, so it keeps those. ``mask`` (B, 1, 1, S) bool, or None to attend every slot. k/v may be
    (B, K, S, hd) views of contiguous (K, B, S, hd) tensors (the paged cache's gather)."""
    B, H, _, hd = q.shape
    K, S = k.shape[1], k.shape[2]
    q = q.reshape(B, K, H // K, hd)
    # The paged cache's head-major gather (:mod:`modules.llm.paged.block_pool`): multiply batched over (K, B),
    # where k and v are contiguous, instead of letting matmul copy both into (B, K) order first.
    head_major = B > 1 and not k.is_contiguous() and k.transpose(0, 1).is_contiguous() \
        and v.transpose(0, 1).is_contiguous()
    if head_major:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        mask = mask.transpose(0, 1) if mask is not None else None                 # (1, B, 1, S)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(hd ** -0.5)       # (B, K, G, S) or (K, B, G, S)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))                                  # broadcasts over heads
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    y = torch.matmul(probs, v)
    return (y.transpose(0, 1) if head_major else y).reshape(B, H, 1, hd)


def _xformers_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     causal: bool) -> torch.Tensor:
    """xformers' memory-efficient attention in its (B, T, H, hd) layout; K/V heads repeated per group, the
    boolean mask turned into an additive bias, plain causal attention as its LowerTriangularMask."""
    import xformers.ops as xops
    B, H, T, _ = q.shape
    groups = H // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.expand(B, H, T, k.shape[2])
    elif causal:
        bias = xops.LowerTriangularMask()
    y = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return y.transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, i, bias=bias)
        self.up_proj = Linear(d, i, bias=bias)
        self.down_proj = Linear(i, d, bias=bias)
        self.row_parallel: RowParallel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj), self.row_parallel)
        return project(F.silu(gate) * up, (self.down_proj,), self.row_parallel)[0]


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def block_step(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One decoder block as training runs it (no cache, plain causal attention): the region
    :meth:`Llama.compile_for_training` hands to ``torch.compile``. One function for every block, so dynamo
    traces it once and reuses the graph for all layers (their parameters are graph inputs)."""
    return block(x, cos, sin, None, None, 0)


def head_loss(norm: RMSNorm, lm_head: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) of the final norm, the output head and the log-softmax: one region,
    so a compiled run never materialises the (B, T, V) fp32 logits that the eager path casts to."""
    logits = lm_head(norm(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


class Llama(nn.Module):
    """Decoder-only Llama: ``logits = model(input_ids)``; pass a :class:`KVCache` to decode incrementally;
    ``loss = model(input_ids, targets=next_ids)`` in training."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # A ModuleDict named "model" gives exactly HF's "model.layers.0...." state-dict keys.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight   # one tensor, counted and saved once
        self.rotary = RotaryEmbedding(config)
        self.row_parallel: RowParallel | None = None
        #: training only: recompute each block in the backward pass instead of storing its activations
        self.activation_checkpointing = False
        #: what a training forward runs per block and for the loss: plain functions, or their torch.compile'd
        #: versions after compile_for_training() (inference and evaluation always run eagerly)
        self._block_step, self._head_loss = block_step, head_loss

    def use_row_parallel(self, threads: int | None) -> None:
        """Split small-batch CPU matmuls over ``threads`` threads (see
        :class:`~modules.llm.cpu_threading.RowParallel`); None or 1: off. The service attaches it per the ``llm.cpu_row_parallel`` setting."""
        if self.row_parallel is not None:
            self.row_parallel.close()
        self.row_parallel = RowParallel(threads) if threads and threads > 1 else None
        for block in self.model.layers:
            block.self_attn.row_parallel = block.mlp.row_parallel = self.row_parallel

    def use_attention(self, backend: str) -> None:
        """"sdpa" (PyTorch) or "xformers" (``--xformers`` with xformers installed) in every layer."""
        if backend not in ("sdpa", "xformers"):
            raise ValueError(f"unknown attention backend {backend!r}: use 'sdpa' or 'xformers'")
        for block in self.model.layers:
            block.self_attn.attention_backend = backend

    def compile_for_training(self) -> None:
        """``torch.compile`` (inductor) the training regions - each decoder block and the head + loss - so
        RMSNorm, RoPE, SwiGLU, autocast's casts and the log-softmax run as fused kernels between the matmuls.

        Regional rather than whole-model compilation: one block graph serves every layer, so compiling costs
        the same for 2 layers or 22, and activation checkpointing and DDP wrap the model unchanged. Only
        gradient-enabled forwards without a cache take these regions (evaluation and decoding stay eager, so
        they add no graphs). The first training step pays for the compilation (about a minute on 2 CPU cores).
        """
        self._block_step, self._head_loss = torch.compile(block_step), torch.compile(head_loss)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())   # parameters() yields a tied tensor once

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for ``batch_size`` rows and ``max_len`` token slots, on the model's device and dtype."""
        # Slots may exceed max_position_embeddings: left-padded rows use more slots than positions.
        # The embedding, never quantized, has the compute dtype (lm_head may be an int8/int4 layer).
        weight = self.model.embed_tokens.weight
        return KVCache(self.config.num_hidden_layers, batch_size, self.config.num_key_value_heads, max_len,
                       self.config.head_dim, dtype=weight.dtype, device=weight.device)

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, key_mask: torch.Tensor | None = None,
                last_only: bool = False, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) with ``last_only``; with ``targets`` (B, T) the mean cross-entropy
        of predicting them instead (a scalar, fp32: what pretraining minimises).

        input_ids: (B, T) token ids. With ``cache``, they are written at slots cache.length .. +T-1 and
        attend causally to every earlier slot. positions: (B, T) RoPE positions (default: slot
        numbers; give them per row for left-padded batches). key_mask: (B, S) bool over all slots after
        the append, S = cache.length + T (or T without a cache); False slots (padding) are never attended.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        self._check_call(B, T, past, cache, positions, key_mask, targets, last_only)
        if positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)                                       # (B, T, D)
        cos, sin = self.rotary(positions, x.dtype)                                   # (B, 1, T, hd)
        mask = self._attention_mask(B, T, past, key_mask, x.device)                  # (B, 1, T, S) | None
        training = self.training and torch.is_grad_enabled()
        recompute = self.activation_checkpointing and training
        plain = training and cache is None and mask is None      # the training region (compiled, if asked)
        for i, block in enumerate(self.model.layers):
            if recompute:
                from torch.utils.checkpoint import checkpoint
                x = (checkpoint(self._block_step, block, x, cos, sin, use_reentrant=False) if plain else
                     checkpoint(block, x, cos, sin, mask, cache, i, use_reentrant=False))
            elif plain:
                x = self._block_step(block, x, cos, sin)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length = past + T
        if targets is not None:
            return (self._head_loss if plain else head_loss)(self.model.norm, self.lm_head, x, targets)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        logits = project(x, (self.lm_head,), self.row_parallel)[0]
        return logits.float()                                                        # (B, T|1, V)

    @staticmethod
    def _attention_mask(B: int, T: int, past: int, key_mask: torch.Tensor | None,
                        device: torch.device) -> torch.Tensor | None:
        """None when plain causal attention (or, for one new token, attending everything) is exact."""
        if key_mask is None and (past == 0 or T == 1):
            return None
        S = past + T
        if key_mask is not None and T == 1:
            # One query per row: it sees exactly the keys its row marks (the paged engine's decode passes put a
            # row's new token anywhere, not always in the last slot); a row that marks none sees its last slot,
            # so its (ignored) output stays finite.
            visible = key_mask.bool()
            lonely = ~visible.any(dim=-1, keepdim=True)
            last = torch.arange(S, device=device)[None, :] == S - 1
            return (visible | (lonely & last))[:, None, None, :]                      # (B, 1, 1, S)
        query_slot = torch.arange(past, S, device=device)[:, None]                  # (T, 1)
        mask = torch.arange(S, device=device)[None, :] <= query_slot                 # (T, S) causal
        if key_mask is None:
            return mask[None, None].expand(B, 1, T, S)
        # A padding query may see no key at all; letting every query see its own slot keeps its
        # (ignored) output finite, so no NaN reaches the cache.
        own = torch.arange(S, device=device)[None, :] == query_slot
        return (mask & (key_mask[:, None, :].bool() | own))[:, None]                # (B, 1, T, S)

    def _check_call(self, B, T, past, cache, positions, key_mask, targets=None, last_only=False) -> None:
        problems = []
        if T < 1:
            problems.append("input_ids must hold at least one token per row")
        if cache is not None:
            if cache.batch_size != B:
                problems.append(f"input_ids has {B} rows but the cache was made for {cache.batch_size}; "
                                "use cache.select_rows() or model.new_kv_cache()")
            if past + T > cache.max_len:
                problems.append(f"{past} cached + {T} new tokens exceed the cache size {cache.max_len}")
        if positions is not None and tuple(positions.shape) != (B, T):
            problems.append(f"positions must have shape {(B, T)} like input_ids, got {tuple(positions.shape)}")
        if targets is not None and (tuple(targets.shape) != (B, T) or last_only):
            problems.append(f"targets must have shape {(B, T)} like input_ids (and no last_only), "
                            f"got {tuple(targets.shape)}")
        if key_mask is not None and tuple(key_mask.shape) != (B, past + T):
            problems.append(f"key_mask must have shape {(B, past + T)} (batch, cached + new slots), "
                            f"got {tuple(key_mask.shape)}")
        if problems:
            raise ValueError("Llama.forward: " + "; ".join(problems))
