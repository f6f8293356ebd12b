r"""Conv-4's batch norm, max-pool and first convolution with cheaper second derivatives (CPU).

Second-order MAML differentiates the inner gradient: every layer's backward is itself
differentiated once more. PyTorch's generic double backward of these three layers does more work
than the mathematics needs on the CPU, and its NCHW max-pool forward is slow; these functions compute
the same values and the same first and second derivatives with less work:

* :func:`batch_norm` (training mode, batch statistics, per-channel affine): the forward and the
  backward are PyTorch's (``y = x * (w r) + (b - mu w r)``, ``native_batch_norm_backward``); the
  backward's own derivative is the closed form below instead of the generic composite one.
* :func:`max_pool2x2` (2x2 windows, stride 2): the maxima are gathered at max-pool's own indices,
  found without autograd on a channels-last copy, so the derivatives are those of a gather (a
  scatter and a gather), as max-pool's are.
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

__all__ = ["batch_norm", "max_pool2x2", "input_conv", "conv"]

_DIMS = (0, 2, 3)


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

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
        zero = torch.zeros_like(w)
        a = zero if a is None else a
        c = zero if c is None else c
        if torch.is_grad_enabled():  # recorded (a third derivative): out of place, statistics as functions of x
            var, mean = torch.var_mean(x, _DIMS, correction=0)
            r = torch.rsqrt(var + ctx.eps)
            xhat = (x - _channel(mean)) * _channel(r)
            means = [g.sum(_DIMS) / M, (g * xhat).sum(_DIMS) / M]
            if u is not None:
                means += [u.sum(_DIMS) / M, (u * xhat).sum(_DIMS) / M, (u * g).sum(_DIMS) / M]
            k = _bn_coefficients(M, w, r, a, c, *means)
            d_g = torch.addcmul(_channel(k["g_const"]), xhat, _channel(k["g_xhat"]))
            d_x = torch.addcmul(_channel(k["x_const"]), xhat, _channel(k["x_xhat"]))
            d_x = torch.addcmul(d_x, g, _channel(k["x_g"]))
            if u is not None:
                d_g = torch.addcmul(d_g, u, _channel(k["g_u"]))
                d_x = torch.addcmul(d_x, u, _channel(k["x_u"]))
            return d_g, d_x, k["w"], None, None, None
        # Not recorded (second order, the usual case): the same with two full-size allocations (xhat,
        # which becomes d_x, and one buffer, which becomes d_g); fresh memory is what costs most here.
        xhat = torch.sub(x, _channel(mean)).mul_(_channel(r))
        buf = torch.mul(g, xhat)
        means = [g.sum(_DIMS) / M, buf.sum(_DIMS) / M]
        if u is not None:
            means.append(u.sum(_DIMS) / M)
            means.append(torch.mul(u, xhat, out=buf).sum(_DIMS) / M)
            means.append(torch.mul(u, g, out=buf).sum(_DIMS) / M)
        k = _bn_coefficients(M, w, r, a, c, *means)
        d_g = torch.addcmul(_channel(k["g_const"]), xhat, _channel(k["g_xhat"]), out=buf)
        d_x = xhat.mul_(_channel(k["x_xhat"])).add_(_channel(k["x_const"])).addcmul_(g, _channel(k["x_g"]))
        if u is not None:
            d_g.addcmul_(u, _channel(k["g_u"]))
            d_x.addcmul_(u, _channel(k["x_u"]))
        return d_g, d_x, k["w"], None, None, None


def _bn_coefficients(M, w, r, a, c, g_mean, gx, u_mean=None, ux=None, ug=None):
    """Per-channel coefficients of the batch-norm double backward (module docstring):
    d_g = g_u u + g_xhat xhat + g_const, d_x = x_u u + x_g g + x_xhat xhat + x_const, d_w = w;
    ``gx``, ``ux``, ``ug`` are the channel means of g xhat, u xhat and u g."""
    if u_mean is None:
        u_mean = ux = ug = torch.zeros_like(w)
    wr, wr2 = w * r, w * r * r
    cov = ug - u_mean * g_mean - ux * gx
    x_g = a * r - wr2 * ux
    return {"w": r * M * cov, "g_u": wr, "g_xhat": a - wr * ux, "g_const": c - wr * u_mean,
            "x_u": -wr2 * gx, "x_g": x_g, "x_xhat": -wr2 * cov + 2 * wr2 * ux * gx - a * r * gx,
            "x_const": wr2 * gx * u_mean - x_g * g_mean}


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``nnf.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` for NCHW ``x``, with a
    closed-form double backward (see the module docstring)."""
    if x.numel() // x.shape[1] < 2:  # the check nnf.batch_norm makes
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    return _BatchNorm.apply(x, weight, bias, eps)


class _MaxPoolChannelsLast(torch.autograd.Function):
    """Max-pool's values and indices on a channels-last tensor, differentiated as the gather it is:
    the backward scatters into the (N, H W, C) view (differentiable: its own derivative is a gather)."""

    @staticmethod
    def forward(ctx, x):
        out, index = nnf.max_pool2d(x, 2, return_indices=True)
        N, C, H, W = x.shape
        ctx.save_for_backward(index.permute(0, 2, 3, 1).reshape(N, -1, C))
        ctx.shape = (N, C, H, W)
        return out

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        N, C, H, W = ctx.shape
        src = g.permute(0, 2, 3, 1).reshape(N, -1, C)
        gx = torch.zeros(N, H * W, C, dtype=g.dtype, device=g.device).scatter_add(1, index, src)
        return gx.view(N, H, W, C).permute(0, 3, 1, 2)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``nnf.max_pool2d(x, 2)`` with max-pool's own values, ties and indices, differentiated as a gather
    at those indices (a scatter, then a gather), which is cheaper than max-pool's own backward here.
    On a channels-last ``x`` (where PyTorch's CPU max-pool is an order of magnitude faster than on
    NCHW) max-pool computes the values; on other layouts the indices come from a channels-last copy
    (without autograd) and the values are gathered."""
    if x.is_contiguous(memory_format=torch.channels_last):
        return _MaxPoolChannelsLast.apply(x)
    N, C, H, W = x.shape
    with torch.no_grad():
        _, index = nnf.max_pool2d(x.detach().contiguous(memory_format=torch.channels_last), 2, return_indices=True)
    h, w = index.shape[-2:]
    return x.reshape(N, C, H * W).gather(2, index.reshape(N, C, h * w)).view(N, C, h, w)


_CONV = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, transposed, output padding, groups


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return nnf.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        return _ConvBackward.apply(gy, x, weight)


class _InputConv(_Conv):
    """:class:`_Conv`'s forward; the backward gives the input no gradient."""

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gw, gb = _InputConvBackward.apply(gy, x, weight)
        return None, gw, gb


class _InputConvBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, weight):
        ctx.save_for_backward(x)
        _, gw, gb = torch.ops.aten.convolution_backward(gy, x, weight, [weight.shape[0]], *_CONV, [False, True, True])
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


class _ConvBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x, weight):
        ctx.save_for_backward(gy, x, weight)
        return torch.ops.aten.convolution_backward(gy, x, weight, [weight.shape[0]], *_CONV, [True, True, True])

    @staticmethod
    def backward(ctx, ugx, ugw, ugb):
        gy, x, w = ctx.saved_tensors
        # gx = conv_transpose(gy, w), gw = correlation of x and gy, gb = sum of gy: all linear in gy.
        # Adjoint in gy: conv(ugx, w) + conv(x, ugw) + ugb, one convolution over the stacked channels.
        if ugx is not None and ugw is not None:
            d_gy = nnf.conv2d(torch.cat([ugx, x], 1), torch.cat([w, ugw], 1), ugb, padding=1)
        elif ugx is not None:
            d_gy = nnf.conv2d(ugx, w, ugb, padding=1)
        elif ugw is not None:
            d_gy = nnf.conv2d(x, ugw, ugb, padding=1)
        else:
            d_gy = None if ugb is None else _channel(ugb).expand_as(gy)
        # In x: gw's term <ugw, gw(x)> = <conv(x, ugw), gy>, whose gradient is conv_transpose(gy, ugw);
        # in w: gx's term <ugx, gx(w)> = <conv(ugx, w), gy>, whose gradient is the correlation of ugx
        # and gy. One convolution backward computes both (input ugx, weight ugw).
        d_x = d_w = None
        if ugx is not None or ugw is not None:
            d_x, d_w, _ = torch.ops.aten.convolution_backward(
                gy, x if ugx is None else ugx, w if ugw is None else ugw, None, *_CONV,
                [ugw is not None, ugx is not None, False])
        return d_gy, d_x, d_w


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``nnf.conv2d(x, weight, bias, padding=1)`` (3x3 kernel, stride 1) with a double backward made of
    one convolution and one convolution backward (PyTorch's generic one computes the weight term as
    a convolution over the batch, which is slow on the CPU)."""
    return _Conv.apply(x, weight, bias)
