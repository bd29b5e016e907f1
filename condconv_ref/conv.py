r"""N-d grouped cross-correlation and its VJP: :func:`conv` and :func:`conv_vjp`.

Shapes: ``x`` is (B, C, \*spatial); a shared kernel is (O, C/groups, \*k) and a
per-example kernel is (B, O, C/groups, \*k); the output is (B, O, \*out).
Each op resolves the namespace and validates its arguments once
(:func:`_check_conv`), then runs the convolution engine
(:mod:`condconv_ref._conv_engine`, which picks its form by shape) on the
validated arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from condconv_ref._conv_engine import conv_memory, run_conv, run_conv_vjp
from condconv_ref._tangent import conv_tangent
from condconv_ref._validate import (
    ConvGeometry,
    ConvOptions,
    check_groups,
    check_ndim,
    check_nonempty,
    check_shape,
    check_tangent_shapes,
    itemsize,
    kernel_layout,
    namespace,
    public_op,
    tangent_namespace,
)
from condconv_ref.memory import check_memory

__all__ = ["conv", "conv_jvp", "conv_vjp"]


def _check_conv(fn: str, x: Any, kernel: Any, bias: Any, options: ConvOptions,
                cotangent: Any = None, *, xp: ModuleType) -> ConvGeometry:
    """Validate a :func:`conv` (``cotangent``: :func:`conv_vjp`) call; return its geometry."""
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    nd = x.ndim - 2
    batch, channels = x.shape[:2]
    check_ndim(fn, "kernel", kernel, (nd + 2, nd + 3),
               f"{kernel_layout(nd, 'O, I/groups')} or per example (B, O, I/groups, *k)")
    per_example = kernel.ndim == nd + 3
    if per_example and kernel.shape[0] != batch:
        raise ValueError(f"{fn}: kernel has batch size {kernel.shape[0]}, expected {batch} to match x")
    out_channels, in_per_group = kernel.shape[-nd - 2: -nd]
    geometry = options.geometry(fn, x.shape[2:], kernel.shape[-nd:])
    check_groups(fn, "kernel", channels, out_channels, in_per_group, geometry.groups)
    if bias is not None:
        check_ndim(fn, "bias", bias, (1, 2), "(O,) or per example (B, O)")
        expected = (batch, out_channels) if bias.ndim == 2 else (out_channels,)
        check_shape(fn, "bias", bias, expected, "(O,) or per example (B, O)")
    if cotangent is not None:
        check_shape(fn, "cotangent", cotangent, (batch, out_channels) + geometry.out,
                    "(B, O, *out), the shape of the output")
    check_nonempty(fn, x=x, kernel=kernel, bias=bias)
    size = itemsize(x, xp=xp)
    check_memory(fn, size, conv_memory(tuple(x.shape), tuple(kernel.shape), geometry, size,
                                         vjp=cotangent is not None))
    return geometry


@public_op
def conv(x: Any, kernel: Any, bias: Any = None, *, stride: Any = 1, padding: Any = 0,
         dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros") -> Any:
    r"""N-d grouped cross-correlation (what deep-learning frameworks call convolution).

    Parameters
    ----------
    x : array, shape (B, C, \*spatial)
        Input, channels first, with 1, 2 or 3 spatial dims.
    kernel : array, shape (O, C/groups, \*k) or (B, O, C/groups, \*k)
        A kernel shared by the batch, or one kernel per example.
    bias : array, shape (O,) or (B, O), optional
        Added to every output position.
    stride, dilation : int or sequence of int
        Per spatial dim, each >= 1.
    padding : int, sequence of int, sequence of (before, after), 'valid' or 'same'
        'same' follows TensorFlow: per dim the total padding is
        ``max((ceil(n/s) - 1) s + (k - 1) d + 1 - n, 0)`` and the odd element
        goes at the end.
    groups : int
        Channels are split into ``groups`` independent blocks.
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}
        PyTorch semantics.

    Returns
    -------
    array, shape (B, O, \*out)
        ``out_i = floor((n_i + pad_i - d_i (k_i - 1) - 1) / s_i) + 1``, in the
        namespace, device and dtype of ``x``.

    Notes
    -----
    With :math:`\tilde x` the padded input, group :math:`g(o)` of output
    channel :math:`o`, and :math:`c` running over that group's channels,

    .. math::

        y_{b,o,p} = \sum_{c,\kappa} W_{(b,)o,c,\kappa}\,
                    \tilde x_{b,\,g(o)\,C/G + c,\; s p + d \kappa} + \beta_{(b,)o}.

    The columns :math:`X_{b,g}[(c,\kappa), p] = \tilde x_{b,gC/G+c, sp + d\kappa}`
    are gathered with one strided slice per kernel offset :math:`\kappa`, so each
    group is one matmul :math:`Y_{b,g} = W_g X_{b,g}`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import conv
    >>> x = np.arange(5.0).reshape(1, 1, 5)
    >>> conv(x, np.ones((1, 1, 3)), padding="same")
    array([[[1., 3., 6., 9., 7.]]])
    """
    xp = namespace("conv", x=x, kernel=kernel, bias=bias)
    geometry = _check_conv("conv", x, kernel, bias,
                           ConvOptions(stride, padding, dilation, groups, padding_mode), xp=xp)
    return run_conv(x, kernel, bias, geometry, xp=xp)


@public_op
def conv_vjp(cotangent: Any, x: Any, kernel: Any, bias: Any = None, *, stride: Any = 1,
             padding: Any = 0, dilation: Any = 1, groups: int = 1,
             padding_mode: str = "zeros") -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`conv`.

    Parameters
    ----------
    cotangent : array, shape (B, O, \*out)
        :math:`\bar y`, the gradient of a scalar loss with respect to the output.
    x, kernel, bias, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`conv`.

    Returns
    -------
    dict
        ``{"x": x̄, "kernel": W̄}`` plus ``"bias": β̄`` when ``bias`` is given,
        each with the shape of its argument.

    Notes
    -----
    Per group, :math:`Y = W X + \beta \mathbf 1^\top` with the columns
    :math:`X` of the padded input.  Differentiating the matmul,

    .. math::

        \bar W = \bar Y X^\top \;(\text{summed over } b \text{ for a shared kernel}),\qquad
        \bar X = W^\top \bar Y,\qquad
        \bar\beta_{(b,)o} = \sum_{(b,)p} \bar y_{b,o,p}.

    :math:`\bar X` is scattered back onto the padded input (col2im, the adjoint
    of the strided gathers: each kernel offset adds its slice), and the padding
    is undone by its adjoint: zero padding drops the border, while reflect,
    replicate and circular padding add each border position's gradient onto the
    input position it was copied from.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import conv_vjp
    >>> grads = conv_vjp(np.ones((1, 1, 3)), np.arange(5.0).reshape(1, 1, 5), np.ones((1, 1, 3)))
    >>> grads["x"]
    array([[[1., 2., 3., 2., 1.]]])
    >>> grads["kernel"]
    array([[[3., 6., 9.]]])
    """
    xp = namespace("conv_vjp", x=x, kernel=kernel, bias=bias, cotangent=cotangent)
    geometry = _check_conv("conv_vjp", x, kernel, bias,
                           ConvOptions(stride, padding, dilation, groups, padding_mode),
                           cotangent, xp=xp)
    return run_conv_vjp(cotangent, x, kernel, bias, geometry, xp=xp)


@public_op
def conv_jvp(tangents: Mapping[str, Any], x: Any, kernel: Any, bias: Any = None, *,
             stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
             padding_mode: str = "zeros") -> Any:
    r"""Jacobian-vector product of :func:`conv`: the derivative of the output along ``tangents``.

    Parameters
    ----------
    tangents : mapping
        :math:`\dot x`, :math:`\dot W`, :math:`\dot\beta` under the keys of
        :func:`conv_vjp`'s gradients (``"x"``, ``"kernel"``, and ``"bias"``
        when ``bias`` is given), each with the shape of its argument.  A
        missing key means a zero tangent.
    x, kernel, bias, stride, padding, dilation, groups, padding_mode
        Exactly the arguments given to :func:`conv`.

    Returns
    -------
    array, shape (B, O, \*out)
        :math:`\dot y = J_x \dot x + J_W \dot W + J_\beta \dot\beta`.

    Notes
    -----
    The convolution is linear in each argument, so its derivative along a
    direction is the sum of the convolutions with one argument replaced by its
    tangent:

    .. math::

        \dot y = \mathrm{conv}(\dot x, W) + \mathrm{conv}(x, \dot W) + \dot\beta_{(b,)o},

    each run by the same convolution engine as the forward (any padding mode
    is linear in :math:`x`, so it pads :math:`\dot x` like :math:`x`).  It is
    the transpose of :func:`conv_vjp`:
    :math:`\langle \bar y, \dot y\rangle = \langle \bar x, \dot x\rangle +
    \langle \bar W, \dot W\rangle + \langle \bar\beta, \dot\beta\rangle`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import conv_jvp
    >>> x, kernel = np.arange(5.0).reshape(1, 1, 5), np.ones((1, 1, 3))
    >>> conv_jvp({"kernel": np.ones((1, 1, 3))}, x, kernel)
    array([[[3., 6., 9.]]])
    >>> conv_jvp({"x": np.ones((1, 1, 5))}, x, kernel)
    array([[[3., 3., 3.]]])
    """
    fn = "conv_jvp"
    tangents, xp = tangent_namespace(fn, tangents, {"x": x, "kernel": kernel, "bias": bias})
    geometry = _check_conv(fn, x, kernel, bias,
                           ConvOptions(stride, padding, dilation, groups, padding_mode), xp=xp)
    check_tangent_shapes(fn, tangents, {"x": x, "kernel": kernel, "bias": bias})
    return conv_tangent(tangents, x, kernel, geometry, xp=xp)
