"""``nn.MultiheadAttention`` rewritten in plain tensor ops, so a scripted stage exports to ONNX.

Scripted, ``nn.MultiheadAttention`` keeps its fast-path checks (``torch.is_autocast_enabled``,
``is_grad_enabled``, nested tensors), which neither ONNX exporter takes: a ViT artifact could
not be exported (``compiler.export``) nor served by the onnxruntime backend. The compiler swaps
each one in the stages it scripts for :class:`PlainAttention`, which computes the same function
in eval mode from the same parameters; ``rewrite.check_equal`` then compares the artifact with the
original model, native attention included.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def supported(m: nn.MultiheadAttention) -> bool:
    """What :class:`PlainAttention` reproduces: no ``add_bias_kv``, no ``add_zero_attn``."""
    return m.bias_k is None and m.bias_v is None and not m.add_zero_attn


class PlainAttention(nn.Module):
    """Eval-mode ``nn.MultiheadAttention.forward``, same signature and outputs: in-projection,
    softmax(q k^T / sqrt(d) + masks) v per head, out-projection. Shares the parameters of the
    module it replaces."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not supported(mha):
            raise ValueError("add_bias_kv and add_zero_attn are not reproduced")
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.embed_dim = mha.embed_dim
        self.batch_first = mha.batch_first
        if mha._qkv_same_embed_dim:
            w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        self.w_q = nn.Parameter(w_q.detach())
        self.w_k = nn.Parameter(w_k.detach())
        self.w_v = nn.Parameter(w_v.detach())
        if mha.in_proj_bias is not None:
            b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
            self.b_q = nn.Parameter(b_q.detach())
            self.b_k = nn.Parameter(b_k.detach())
            self.b_v = nn.Parameter(b_v.detach())
        else:
            self.register_parameter("b_q", None)
            self.register_parameter("b_k", None)
            self.register_parameter("b_v", None)
        self.out_proj = nn.Linear(mha.embed_dim, mha.embed_dim, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    @staticmethod
    def _additive(mask: Tensor, like: Tensor) -> Tensor:
        """A boolean mask (True: not attended) as -inf / 0; a float mask as it is."""
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=like.dtype, device=like.device) \
                .masked_fill(mask, float("-inf"))
        return mask.to(like.dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, t, s = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = F.linear(query, self.w_q, self.b_q).reshape(n, t, h, d).transpose(1, 2)
        k = F.linear(key, self.w_k, self.b_k).reshape(n, s, h, d).transpose(1, 2)
        v = F.linear(value, self.w_v, self.b_v).reshape(n, s, h, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (float(d) ** -0.5)   # [n, h, t, s]
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).triu(1)
        if attn_mask is not None:
            m = self._additive(attn_mask, scores)
            scores = scores + (m.reshape(n, h, t, s) if m.dim() == 3 else m)
        if key_padding_mask is not None:
            scores = scores + self._additive(key_padding_mask, scores).reshape(n, 1, 1, s)
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(n, t, h * d)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights.squeeze(0) if unbatched else weights)


def swap_attention(module: nn.Module) -> int:
    """Replace, in place, every supported ``nn.MultiheadAttention`` under ``module`` (not
    ``module`` itself) with a :class:`PlainAttention`; returns how many."""
    swaps = [(parent, name, child) for parent in module.modules()
             for name, child in parent.named_children()
             if type(child) is nn.MultiheadAttention and supported(child)]
    for parent, name, child in swaps:
        setattr(parent, name, PlainAttention(child).train(child.training))
    return len(swaps)
