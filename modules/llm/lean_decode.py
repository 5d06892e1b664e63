"""A lean batch-1 forward pass for small draft models: the same maths as :class:`~modules.llm.model.Llama`,
with less work around it.

Why: a draft model of a few million parameters spends most of each decode step outside its matrix
products (profiled on the shipped ``atelier-tiny-draft``: about a quarter of a step is ``aten::mm``, the
rest is module calls, views, RoPE and cache bookkeeping). Speculative decoding gains only when a draft
step costs a small fraction of a target step, so the draft's step is written out here once:

* q/k/v and gate/up are single matrix products over weights concatenated once at set-up;
* RoPE cos/sin for every position are computed once (in fp32, cast to the model's dtype as the model
  does), and one step slices them instead of recomputing angles;
* no mask is built for the common cases (one new token; a prompt from an empty cache);
* norms skip the fp32 round trip when the model is fp32.

The output differs from :class:`Llama` only by floating-point summation order (a draft's numbers affect
how many drafts are accepted, never the output: the target decides every token). Models it cannot run
exactly (quantized or row-parallel linears, RoPE scaling, biases) make :func:`lean_decoder` return None,
and the caller drafts with the model itself.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modules.llm.cpu_threading import Linear, linear
from modules.llm.model import _SDPA_HAS_GQA


class LeanDecoder:
    """Batch-1 incremental decoding of one Llama with its own KV cache of *slots* positions."""

    def __init__(self, model: Any, slots: int):
        cfg = model.config
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        weight = model.model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.embed = weight
        self.eps = float(cfg.rms_norm_eps)
        q, kv = self.n_head * self.hd, self.n_kv * self.hd
        self.split = (q, kv, kv)
        self.layers = []
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            self.layers.append((
                block.input_layernorm.weight,
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous(),
                attn.o_proj.weight,
                block.post_attention_layernorm.weight,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                mlp.down_proj.weight,
            ))
        self.inter = model.model.layers[0].mlp.gate_proj.weight.shape[0]
        self.norm = model.model.norm.weight
        self.lm_head = model.lm_head.weight
        positions = torch.arange(slots, device=self.device)[None]
        cos, sin = model.rotary(positions, self.dtype)                         # (1, 1, slots, hd)
        self.cos, self.sin = cos[0, 0], sin[0, 0]                              # (slots, hd)
        shape = (1, self.n_kv, slots, self.hd)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.slots = slots
        self.length = 0

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate(n={n}): n must be between 0 and the cache length {self.length}")
        self.length = n

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    @torch.inference_mode()
    def __call__(self, ids: list[int], *, last_only: bool = True) -> torch.Tensor:
        """Logits [T, V] (or [1, V] with *last_only*), fp32, after appending *ids* to the cache."""
        T, past = len(ids), self.length
        end = past + T
        if end > self.slots:
            raise ValueError(f"{past} cached + {T} new tokens exceed the cache size {self.slots}")
        x = F.embedding(torch.tensor(ids, device=self.device), self.embed)[None]   # (1, T, D)
        cos, sin = self.cos[past:end], self.sin[past:end]                          # (T, hd)
        mask = None
        if T > 1 and past > 0:
            slot = torch.arange(end, device=self.device)
            mask = slot[None, :] <= slot[past:, None]                              # (T, S) causal
        causal = T > 1 and past == 0
        H, K, hd = self.n_head, self.n_kv, self.hd
        for i, (ln1, wqkv, wo, ln2, wgu, wdown) in enumerate(self.layers):
            h = self._norm(x, ln1)
            q, k, v = linear(h, wqkv).split(self.split, dim=-1)
            q = self._rope(q.view(1, T, H, hd).transpose(1, 2), cos, sin)
            k = self._rope(k.view(1, T, K, hd).transpose(1, 2), cos, sin)
            kc, vc = self.k[i], self.v[i]
            kc[:, :, past:end] = k
            vc[:, :, past:end] = v.view(1, T, K, hd).transpose(1, 2)
            kc, vc = kc[:, :, :end], vc[:, :, :end]
            if _SDPA_HAS_GQA:
                y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, is_causal=causal, enable_gqa=H != K)
            else:
                g = H // K
                kc = kc[:, :, None].expand(1, K, g, end, hd).reshape(1, H, end, hd)
                vc = vc[:, :, None].expand(1, K, g, end, hd).reshape(1, H, end, hd)
                y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, is_causal=causal)
            x = x + linear(y.transpose(1, 2).reshape(1, T, H * hd), wo)
            gate, up = linear(self._norm(x, ln2), wgu).split(self.inter, dim=-1)
            x = x + linear(F.silu(gate) * up, wdown)
        self.length = end
        if last_only:
            x = x[:, -1:]
        return linear(self._norm(x, self.norm), self.lm_head)[0].float()


def lean_decoder(model: Any, slots: int) -> LeanDecoder | None:
    """A LeanDecoder for *model*, or None when it has what the lean pass does not do exactly (quantized or
    row-parallel linears, linear biases, RoPE scaling, xformers attention)."""
    cfg = model.config
    if getattr(cfg, "rope_scaling", None) or getattr(model, "row_parallel", None) is not None:
        return None
    linears = [model.lm_head]
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if getattr(attn, "attention_backend", "sdpa") != "sdpa":
            return None
        linears += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if any(type(m) not in (nn.Linear, Linear) or m.bias is not None for m in linears):
        return None
    return LeanDecoder(model, slots)
