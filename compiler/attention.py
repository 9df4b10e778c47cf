"""Attention rewritten in plain tensor ops, so a scripted stage exports to ONNX.

Scripted, ``nn.MultiheadAttention`` keeps its fast-path checks (``torch.is_autocast_enabled``,
``is_grad_enabled``, nested tensors), which neither ONNX exporter takes: a ViT artifact could
not be exported (``compiler.export``) nor served by the onnxruntime backend. The compiler swaps
each one in the stages it scripts for :class:`PlainAttention`, which computes the same function
in eval mode from the same parameters; ``rewrite.check_equal`` then compares the artifact with the
original model, native attention included.

Swin's shifted-window attention (torchvision's ``shifted_window_attention``, a function fx keeps
as one call) copies a list, which scripted becomes ``aten::copy`` on a list: no exporter takes
it. :func:`swap_window_attention` points those calls at :func:`window_attention`, the same
function without the list copy.
"""
import math
import sys
from typing import List, Optional, Tuple

import torch
import torch.fx as fx
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


def window_attention(input: Tensor, qkv_weight: Tensor, proj_weight: Tensor,
                     relative_position_bias: Tensor, window_size: List[int], num_heads: int,
                     shift_size: List[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                     qkv_bias: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None,
                     logit_scale: Optional[Tensor] = None, training: bool = True) -> Tensor:
    """torchvision's ``shifted_window_attention`` (Swin v1 and v2), same signature and result.

    No list is copied and nothing branches on the map's size, which scripted gives values the
    exporters cannot fold: the shifts are ints (0 where a window covers the map), the cyclic
    shifts are slices, and the mask is built from the shifts (all zeros without one).
    """
    B, H, W, C = input.shape
    wh, ww = window_size[0], window_size[1]
    pad_r = (ww - W % ww) % ww
    pad_b = (wh - H % wh) % wh
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    sh = shift_size[0] * int(wh < pad_H)   # a window as large as the map needs no shift
    sw = shift_size[1] * int(ww < pad_W)
    x = torch.cat((x[:, sh:], x[:, :sh]), dim=1)       # torch.roll by (-sh, -sw)
    x = torch.cat((x[:, :, sw:], x[:, :, :sw]), dim=2)

    num_windows = (pad_H // wh) * (pad_W // ww)
    x = x.view(B, pad_H // wh, wh, pad_W // ww, ww, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, wh * ww, C)

    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length:2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:   # cosine attention (Swin v2)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        q = q * (C // num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias

    # The shifted map's regions, 0 to 2 along each axis: the rows before the last window, the
    # last window's rows before the last shift, and the last shift's rows (one region along an
    # axis without a shift). Rows of different regions do not attend to each other.
    rows = torch.arange(pad_H, device=x.device)
    cols = torch.arange(pad_W, device=x.device)
    region_h = (rows >= pad_H - wh).to(x.dtype) * min(sh, 1) + (rows >= pad_H - sh).to(x.dtype)
    region_w = (cols >= pad_W - ww).to(x.dtype) * min(sw, 1) + (cols >= pad_W - sw).to(x.dtype)
    attn_mask = region_h.unsqueeze(1) * 3.0 + region_w.unsqueeze(0)
    attn_mask = attn_mask.view(pad_H // wh, wh, pad_W // ww, ww)
    attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, wh * ww)
    attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)) \
        .masked_fill(attn_mask == 0, float(0.0))
    attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
    attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
    attn = attn.view(-1, num_heads, x.size(1), x.size(1))

    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), C)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)

    x = x.view(B, pad_H // wh, pad_W // ww, wh, ww, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    x = torch.cat((x[:, pad_H - sh:], x[:, :pad_H - sh]), dim=1)   # torch.roll by (sh, sw)
    x = torch.cat((x[:, :, pad_W - sw:], x[:, :, :pad_W - sw]), dim=2)
    return x[:, :H, :W, :].contiguous()


def swap_window_attention(gm: fx.GraphModule) -> int:
    """Point, in place, every call of torchvision's ``shifted_window_attention`` in ``gm`` at
    :func:`window_attention`; returns how many (then ``gm`` is recompiled)."""
    swin = sys.modules.get("torchvision.models.swin_transformer")   # a Swin model imported it
    native = getattr(swin, "shifted_window_attention", None)
    if native is None:
        return 0
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is native]
    for node in calls:
        node.target = window_attention
    if calls:
        gm.graph.lint()
        gm.recompile()
    return len(calls)
