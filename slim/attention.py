"""Explicit Whisper attention: projections sized per layer, the two matmuls as modules.

Stock HF Whisper attention goes through a fused `scaled_dot_product_attention` call (nowhere for a
fake-quant observer to attach) and insists on `embed_dim == num_heads * head_dim` (so a pruned layer
cannot even be built). `SlimAttention` keeps HF's parameter names and call signature, so it drops into
`WhisperEncoderLayer` / `WhisperDecoderLayer` in place, and:

* sizes Q/K/V/out to `num_heads * head_dim` with `head_dim` fixed by the base model, so every layer
  (and every attention kind) may keep a different number of heads;
* runs `Q·Kᵀ` and `P·V` through `MatMul` modules, the attach points for activation quantizers;
* computes softmax in fp32;
* reads and writes HF's `EncoderDecoderCache` exactly as `WhisperAttention.forward` does in the
  pinned transformers release (5.23), so `generate` works with the self- and cross-attention cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache


class MatMul(nn.Module):
    """`a @ b` as a module, so quantizers can wrap its two inputs (QAT attaches here)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class SlimAttention(nn.Module):
    """Multi-head attention with `num_heads` heads of width `head_dim` on a `d_model` stream.

    Self-attention can read keys/values beyond its own frames: `context` = (k, v), (1 or B, H, S, D), joined
    after the frames' own (an audio window's silent rest, `slim.model.SlimEncoder`); `keep_kv` keeps the
    frames' own (k, v) in `kept_kv` (how that context is made)."""

    context: tuple[torch.Tensor, torch.Tensor] | None = None
    keep_kv: bool = False
    kept_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        is_decoder: bool = False,
        is_causal: bool = False,
        layer_idx: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.is_decoder, self.is_causal, self.layer_idx = is_decoder, is_causal, layer_idx
        self.dropout = dropout
        self.scaling = head_dim**-0.5
        # Whisper's key projection has no bias (the key bias would cancel in softmax anyway).
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.out_proj = nn.Linear(inner, d_model, bias=bias)
        self.qk = MatMul()
        self.pv = MatMul()

    @classmethod
    def from_whisper(cls, attn: nn.Module) -> "SlimAttention":
        """Swap in for an HF `WhisperAttention`, reusing its Linear modules (same Parameters)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.d_model = attn.q_proj.in_features
        new.num_heads, new.head_dim = attn.num_heads, attn.head_dim
        new.is_decoder, new.is_causal, new.layer_idx = attn.is_decoder, attn.is_causal, attn.layer_idx
        new.dropout = attn.dropout
        new.scaling = attn.head_dim**-0.5
        new.k_proj, new.v_proj, new.q_proj, new.out_proj = attn.k_proj, attn.v_proj, attn.q_proj, attn.out_proj
        new.qk, new.pv = MatMul(), MatMul()
        return new

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        # (B, S, H*D) -> (B, H, S, D). The batch comes from the query, as in HF: a cross-attention
        # input with another batch size is folded into the sequence axis instead of failing.
        seq = x.shape[0] * x.shape[1] // batch  # explicit: -1 is ambiguous for a layer with no heads left
        return x.reshape(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = hidden_states.shape[:2]
        is_cross = key_value_states is not None
        # Scale Q before the matmul, as OpenAI and HF do: Whisper is sensitive to the order.
        q = (self.q_proj(hidden_states) * self.scaling).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        cache, is_updated = past_key_values, False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx, False)
            if is_cross:
                # from the second generated token on, the cross-attention K/V come from the cache
                cache.is_updated[self.layer_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache

        if is_cross and cache is not None and is_updated:
            k = cache.layers[self.layer_idx].keys
            v = cache.layers[self.layer_idx].values
        else:
            src = key_value_states if is_cross else hidden_states
            k = self._heads(self.k_proj(src), B)
            v = self._heads(self.v_proj(src), B)
            if self.keep_kv:
                self.kept_kv = (k, v)
            if self.context is not None and not is_cross:
                ck, cv = self.context
                k = torch.cat([k, ck.to(k.dtype).expand(B, -1, -1, -1)], dim=2)
                v = torch.cat([v, cv.to(v.dtype).expand(B, -1, -1, -1)], dim=2)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)

        scores = self.qk(q, k.transpose(2, 3))
        if attention_mask is not None:
            mask = attention_mask[:, :, :, : k.shape[-2]]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = nn.functional.dropout(probs, p=self.dropout, training=self.training)
        out = self.pv(probs, v)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.out_proj(out), (probs if output_attentions else None)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}"
