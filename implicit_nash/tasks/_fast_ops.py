r"""Conv-4's batch norm, max-pool and first convolution with cheaper second derivatives (CPU).

Second-order MAML differentiates the inner gradient: every layer's backward is itself
differentiated once more. PyTorch's generic double backward of these three layers does more work
than the mathematics needs on the CPU, and its NCHW max-pool forward is slow; these functions compute
the same values and the same first and second derivatives with less work:

* :func:`batch_norm` (training mode, batch statistics, per-channel affine): the forward and the
  backward are PyTorch's (``y = x * (w r) + (b - mu w r)``, ``native_batch_norm_backward``); the
  backward's own derivative is the closed form below instead of the generic composite one.
* :func:`max_pool2x2` (2x2 windows, stride 2): the maxima are gathered at indices found without
  autograd, so the derivatives are those of a gather (a scatter and a gather), as max-pool's are.
* :func:`input_conv` (a 3x3 convolution, padding 1, whose input needs no gradient: the images):
  the double backward of PyTorch's convolution computes a transposed convolution for the input's
  gradient even when the input needs none; here it is not computed.

Higher derivatives stay exact: the backward of the backward is written in differentiable torch
operations, and when it is itself recorded (a third derivative) the batch statistics are recomputed
from the input inside the graph. Inside a ``torch.func`` transform (``vmap``,
``grad``) :class:`~implicit_nash.tasks.Conv4` uses PyTorch's own layers instead.

The batch-norm double backward. Per channel, with :math:`M` elements, :math:`\mu`, :math:`r =
(\sigma^2 + \epsilon)^{-1/2}`, :math:`\hat x = (x - \mu) r` and the backward :math:`g_x = w r\,P g`,
:math:`g_w = \sum g \hat x`, :math:`g_b = \sum g`, where :math:`P g = g - \bar g - \hat x\,
\overline{g \hat x}` (bars are means over the channel's elements). Given the cotangents
:math:`u, a, c` of :math:`g_x, g_w, g_b`, using :math:`\partial_x \sum v \hat x = r P v` and
:math:`\partial_x r = -r^2 \hat x / M`:

.. math::

    \partial_g &= w r\,P u + a \hat x + c, \qquad
    \partial_w = r M (\overline{ug} - \bar u \bar g - \overline{u\hat x}\,\overline{g\hat x}), \\
    \partial_x &= -w r^2 \big[(\overline{ug} - \bar u \bar g - \overline{u\hat x}\,
    \overline{g\hat x})\hat x + \overline{g\hat x}\,P u + \overline{u\hat x}\,P g\big] + a r\,P g.

``tests/test_fast_ops.py`` checks all of it against PyTorch's layers in float64.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as nnf

__all__ = ["batch_norm", "max_pool2x2", "input_conv"]

_DIMS = (0, 2, 3)


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        var, mean = torch.var_mean(x, _DIMS, correction=0)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return torch.addcmul(_channel(bias - mean * scale), x, _channel(scale))

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw, gb, None


class _BatchNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps):
        ctx.save_for_backward(gy, x, weight, mean, invstd)
        ctx.eps = eps
        return torch.ops.aten.native_batch_norm_backward(gy, x, weight, None, None, mean, invstd, True, eps,
                                                         [True, True, True])

    @staticmethod
    def backward(ctx, u, a, c):
        g, x, w, mean, r = ctx.saved_tensors
        M = x.numel() // x.shape[1]
        if torch.is_grad_enabled():  # this backward is being recorded: the statistics as functions of x
            var, mean = torch.var_mean(x, _DIMS, correction=0)
            r = torch.rsqrt(var + ctx.eps)
        xhat = (x - _channel(mean)) * _channel(r)
        gxm = (g * xhat).sum(_DIMS) / M  # mean of g * xhat
        g_mean = g.sum(_DIMS) / M
        zero = torch.zeros_like(w)
        a = zero if a is None else a
        c = zero if c is None else c
        if u is None:
            u_mean = ux = ug = zero
        else:
            u_mean = u.sum(_DIMS) / M
            ux = (u * xhat).sum(_DIMS) / M
            ug = (u * g).sum(_DIMS) / M
        wr, wr2 = w * r, w * r * r
        cov = ug - u_mean * g_mean - ux * gxm
        d_w = r * M * cov
        # d_g = w r P u + a xhat + c
        d_g = torch.addcmul(_channel(c - wr * u_mean), xhat, _channel(a - wr * ux))
        # d_x = -w r^2 [cov xhat + gxm P u + ux P g] + a r P g
        coef_g = a * r - wr2 * ux
        coef_x = -wr2 * cov + wr2 * ux * gxm + wr2 * ux * gxm - a * r * gxm
        const = wr2 * gxm * u_mean - coef_g * g_mean
        d_x = torch.addcmul(_channel(const), xhat, _channel(coef_x))
        d_x.addcmul_(g, _channel(coef_g))
        if u is not None:
            d_g.addcmul_(u, _channel(wr))
            d_x.addcmul_(u, _channel(-wr2 * gxm))
        return d_g, d_x, d_w, None, None, None


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``nnf.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` for NCHW ``x``, with a
    closed-form double backward (see the module docstring)."""
    return _BatchNorm.apply(x, weight, bias, eps)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``nnf.max_pool2d(x, 2)``: each 2x2 window's maximum, gathered at its index (found without
    autograd), so that the derivatives are a gather's. Odd trailing rows/columns are dropped, as
    max-pool drops them. Ties (measure zero for continuous inputs) go to the first element in
    max-pool's scan order, as in max-pool."""
    N, C, H, W = x.shape
    h, w = H // 2, W // 2
    with torch.no_grad():
        v = x[:, :, :2 * h, :2 * w]
        a, b, c, d = v[..., 0::2, 0::2], v[..., 0::2, 1::2], v[..., 1::2, 0::2], v[..., 1::2, 1::2]
        right_top, right_bottom = b > a, d > c
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        down = bottom > top
        col = torch.where(down, right_bottom, right_top).to(torch.long)
        rows = torch.arange(h, device=x.device).view(h, 1) * (2 * W)
        cols = torch.arange(w, device=x.device) * 2
        index = (rows + cols) + down.to(torch.long) * W + col
    return x.reshape(N, C, H * W).gather(2, index.reshape(N, C, h * w)).view(N, C, h, w)


class _InputConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return nnf.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gw, gb = _InputConvBackward.apply(gy, x, weight)
        return None, gw, gb


class _InputConvBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, weight):
        ctx.save_for_backward(x)
        _, gw, gb = torch.ops.aten.convolution_backward(gy, x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1],
                                                         False, [0, 0], 1, [False, True, True])
        return gw, gb

    @staticmethod
    def backward(ctx, uw: Optional[torch.Tensor], ub: Optional[torch.Tensor]):
        (x,) = ctx.saved_tensors
        # gw and gb are linear in gy: their adjoints are the convolution of x with uw, plus ub
        if uw is None:
            uw = x.new_zeros(ub.shape[0], x.shape[1], 3, 3)
        return nnf.conv2d(x, uw, ub, padding=1), None, None


def input_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``nnf.conv2d(x, weight, bias, padding=1)`` for an input that needs no gradient (3x3 kernel,
    stride 1), with a double backward that skips the input's gradient."""
    if x.requires_grad:
        raise ValueError("input_conv is for an input that needs no gradient; use nnf.conv2d")
    return _InputConv.apply(x, weight, bias)
