"""FLOP estimates per aten op: torch's formulas for matmul-like ops, numel rules for the rest.

FLOPs here count a multiply-add as 2 (torch.utils.flop_counter's convention). Ops that no rule
covers are counted in ``unsupported`` (op name -> calls) and contribute nothing; callers report
them so the estimate is never silently low.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

# Ops that move or re-view data without arithmetic.
_FREE = {
    aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t, aten.expand,
    aten.squeeze, aten.unsqueeze, aten.flatten, aten.select, aten.slice, aten.cat, aten.stack,
    aten.clone, aten.contiguous, aten.detach, aten._to_copy, aten.to, aten.copy_, aten.split,
    aten.split_with_sizes, aten.chunk, aten.unbind, aten.alias, aten.empty, aten.zeros, aten.ones,
    aten.full, aten.zeros_like, aten.ones_like, aten.empty_like, aten.new_zeros, aten.new_empty,
    aten.arange, aten.lift_fresh, aten.lift_fresh_copy, aten.index_select, aten.index,
    aten.dropout, aten.native_dropout, aten.sym_size, aten.sym_numel, aten.sym_stride, aten.dim,
    aten.size, aten.stride, aten.as_strided, aten.constant_pad_nd, aten.pad, aten.roll,
    aten.channel_shuffle, aten.pixel_shuffle, aten._assert_tensor_metadata, aten.scalar_tensor,
    aten.masked_fill, aten.where, aten.fill_, aten.gather, aten.scatter, aten.index_put,
    aten.new_full, aten.repeat, aten.unflatten, aten.movedim, aten.narrow, aten.eq, aten.ne,
    aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not, aten.logical_and, aten.argmax,
    aten._assert_async, aten.item, aten._local_scalar_dense, aten.as_strided_,
}
# One FLOP per output element.
_ELEMENTWISE = {
    aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_, aten.relu,
    aten.relu_, aten.relu6, aten.hardtanh, aten.hardtanh_, aten.neg, aten.abs, aten.clamp,
    aten.clamp_, aten.clamp_min, aten.clamp_max, aten.maximum, aten.minimum, aten.rsub,
    aten.leaky_relu, aten.leaky_relu_, aten.threshold, aten.sqrt, aten.rsqrt, aten.pow, aten.exp,
    aten.log, aten.reciprocal, aten.addcmul, aten.addcdiv, aten.sigmoid_, aten.hardsigmoid_,
    aten.hardswish_, aten.silu_, aten.mean, aten.sum, aten.amax, aten.max, aten.min,
    aten.gelu_, aten.tanh_,
}
# Transcendental activations, a few FLOPs per element.
_ACTIVATION = {aten.sigmoid: 4, aten.tanh: 4, aten.gelu: 8, aten.silu: 5, aten.hardswish: 4,
               aten.hardsigmoid: 3, aten.erf: 4, aten.elu: 4, aten.softplus: 4, aten.mish: 6}
# Normalisations and softmax: a few FLOPs per element of the input.
_NORM = {aten._native_batch_norm_legit_no_training: 2, aten.native_batch_norm: 2,
         aten._native_batch_norm_legit: 2, aten.batch_norm: 2, aten.native_layer_norm: 5,
         aten.layer_norm: 5, aten.native_group_norm: 5, aten.group_norm: 5,
         aten._softmax: 5, aten.softmax: 5, aten._log_softmax: 5, aten.log_softmax: 5,
         aten.cudnn_batch_norm: 2, aten._native_batch_norm_legit_functional: 2}
# Pooling: one FLOP per input element read.
_POOL = {aten.max_pool2d, aten.max_pool2d_with_indices, aten.avg_pool2d, aten.adaptive_avg_pool2d,
         aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.avg_pool1d, aten.max_pool1d,
         aten.adaptive_avg_pool1d, aten.max_pool3d, aten.avg_pool3d}


def _first_tensor(seq):
    for a in seq:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


def _mha_flops(query, key) -> int:
    """nn.MultiheadAttention's fused kernel: q/k/v and output projections plus two attention matmuls."""
    b, t, d = query.shape
    s = key.shape[1]
    return 2 * b * t * d * d * 2 + 2 * b * s * d * d * 2 + 2 * 2 * b * t * s * d


def op_flops(func, args, kwargs, out):
    """FLOPs of one aten call, or None when no rule covers the op."""
    packet = func._overloadpacket
    if packet is aten._native_multi_head_attention:
        return _mha_flops(args[0], args[1])
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    if packet in _FREE:
        return 0
    out_t = _first_tensor([out])
    if packet in _ELEMENTWISE:
        ref = _first_tensor(args) if packet in (aten.mean, aten.sum, aten.amax, aten.max,
                                                aten.min) else out_t
        return int(ref.numel()) if ref is not None else 0
    if packet in _ACTIVATION:
        return _ACTIVATION[packet] * int(out_t.numel())
    if packet in _NORM:
        return _NORM[packet] * int(_first_tensor(args).numel())
    if packet in _POOL:
        return int(_first_tensor(args).numel())
    return None


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of every aten op run inside it; unknown ops land in ``unsupported``."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.unsupported = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        n = op_flops(func, args, kwargs, out)
        if n is None:
            self.unsupported[str(func._overloadpacket)] += 1
        else:
            self.flops += n
        return out
