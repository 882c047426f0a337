"""FP8 linear on plain PyTorch (``torch._scaled_mm``): the FP8 backend when neither Transformer
Engine nor torchao is installed (a bare GPU machine with only torch).

Recipe: dynamic tensor-wise scaling ("current" scaling). Each GEMM operand is scaled by
``FP8_MAX / amax`` of that tensor at that step and cast; activations and weights to E4M3, the
output gradient to E5M2 (wider range). All three GEMMs run in FP8 with fp32 accumulation:

  forward  y  = x  @ W^T      (E4M3 x E4M3)
  dgrad    dx = dy @ W        (E5M2 x E4M3)
  wgrad    dW = dy^T @ x      (E5M2 x E4M3)

The FP8 copies of x and W are what the backward keeps (half the bytes of bf16 activations).
``_scaled_mm`` needs the inner dim and the second operand's outer dim to be multiples of 16: the
feature dims are checked at conversion (``fp8.py``); the token dim, which is the inner dim of the
wgrad GEMM, is zero-padded here (zero rows add nothing to dW).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# _scaled_mm operand dims must be multiples of this
SCALED_MM_MULTIPLE = 16
# smallest amax used for scaling: keeps an all-zero tensor from producing an infinite scale
AMAX_EPS = 1e-12


def quantize(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in ``fp8_dtype`` scaled into its range, fp32 dequantisation scale).

    Few passes over x, no fp32 copy (eager casts are memory-bound and run on every GEMM operand):
    one min/max reduction, one scaled copy in x's dtype, an in-place clamp (E4M3 has no inf: an
    overflow would become NaN), the cast. The dequantisation scale is the reciprocal of the scale
    actually applied (after rounding it to x's dtype), so dequantise(quantise(x)) is consistent.
    """
    fp8_max = torch.finfo(fp8_dtype).max
    lo, hi = torch.aminmax(x.detach())
    amax = torch.maximum(lo.abs(), hi.abs()).float().clamp_min(AMAX_EPS)
    scale = (fp8_max / amax).to(x.dtype)
    q = (x.detach() * scale).clamp_(-fp8_max, fp8_max).to(fp8_dtype)
    return q, scale.float().reciprocal()


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix with column-major strides (``_scaled_mm``'s second operand layout)."""
    return t.t().contiguous().t()


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    pad = (-t.shape[0]) % SCALED_MM_MULTIPLE
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
               fast_accum: bool) -> torch.Tensor:
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=fast_accum)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq, sx = quantize(x2, E4M3)
        wq, sw = quantize(weight, E4M3)
        # forward GEMM: fast accumulation, as the recipes of TE and torchao do for the output GEMM
        y = _scaled_mm(xq, wq.t(), sx, sw, x.dtype, fast_accum=True)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.meta = (lead, x.dtype, weight.dtype, bias is not None)
        return y.reshape(*lead, -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, sx, wq, sw = ctx.saved_tensors
        lead, x_dtype, w_dtype, has_bias = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        gq, sg = quantize(dy2, E5M2)
        dx = _scaled_mm(gq, _column_major(wq), sg, sw, x_dtype, fast_accum=False)
        # wgrad contracts over tokens: pad them to the GEMM multiple
        gt = _pad_rows(gq.view(torch.uint8)).view(E5M2).t().contiguous()
        xp = _pad_rows(xq.view(torch.uint8)).view(E4M3)
        dw = _scaled_mm(gt, _column_major(xp), sg, sx, w_dtype, fast_accum=False)
        db = dy2.sum(0).to(w_dtype) if has_bias else None
        return dx.reshape(*lead, -1), dw, db


class TorchFP8Linear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run in FP8 (same parameters, same state-dict keys)."""

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "TorchFP8Linear":
        """Wraps the existing parameters (no copy: optimizers and ZeRO see the same tensors)."""
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight = lin.weight
        new.bias = lin.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8Linear.apply(x, self.weight, self.bias)
