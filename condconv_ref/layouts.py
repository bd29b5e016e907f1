r"""Converters between the reference's layouts and the storage public implementations use.

The reference stores experts as (E, O, C/groups, \*k) and takes inputs
channels-first, (B, C, \*spatial).  Public code stores them differently:

============================== ==========================  =====================================
storage                        shape                       converters
============================== ==========================  =====================================
PyTorch flattened OIHW         (E, O·C/g·\*k)              :func:`to_torch_flat_experts`,
(timm ``CondConv2d``, the                                  :func:`from_torch_flat_experts`
grouped-conv batch trick)
TensorFlow flattened HWIO      (E, \*k·C/g·O)              :func:`to_tf_flat_experts`,
(``CondConv2D``)                                           :func:`from_tf_flat_experts`
TensorFlow flattened depthwise (E, \*k·C·m)                :func:`to_tf_flat_depthwise_experts`,
(``DepthwiseCondConv2D``)                                  :func:`from_tf_flat_depthwise_experts`
Flax ``Conv`` kernels,         (E, \*k, C/g, O)            :func:`to_flax_experts`,
stacked per expert (JAX's                                  :func:`from_flax_experts`
``HWIO``)
Flax ``Dense`` kernels         (in, out), or               :func:`to_flax_dense`,
(transposed ``nn.Linear``)     (E, F_in, F_out)            :func:`from_flax_dense`
channels-last inputs/outputs   (B, \*spatial, C)           :func:`to_channels_last`,
                                                           :func:`to_channels_first`
============================== ==========================  =====================================

Each ``from_*`` is the inverse of its ``to_*``.  Flattened storage loses the
kernel's shape, so the ``from_*`` converters take ``kernel_shape``, the shape of
one expert in the reference's layout.  In the depthwise layout, output channel
``c·m + j`` is input channel ``c``'s ``j``-th filter, as in TensorFlow's
``depthwise_conv2d`` and the reference's :func:`condconv_ref.depthwise_condconv`;
so it is in a grouped convolution of JAX (``feature_group_count=C``), whose
depthwise kernels (E, C·m, 1, \*k) :func:`to_flax_experts` converts like any other.
Every converter is a reshape and a transpose written against the array API: it
keeps the input's namespace, device and dtype.  An array of a library outside
the array API (a TensorFlow tensor, say) is read through DLPack or NumPy's
``__array__`` and converted as a NumPy array.

Examples
--------
>>> import numpy as np
>>> from condconv_ref import layouts
>>> experts = np.arange(2 * 4 * 3 * 3 * 3.0).reshape(2, 4, 3, 3, 3)  # E=2, O=4, C=3, 3x3
>>> flat = layouts.to_tf_flat_experts(experts)
>>> flat.shape
(2, 108)
>>> bool(np.all(flat[1].reshape(3, 3, 3, 4)[2, 0, 1, 3] == experts[1, 3, 1, 2, 0]))
True
>>> bool(np.all(layouts.from_tf_flat_experts(flat, (4, 3, 3, 3)) == experts))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from condconv_ref._validate import (
    any_array,
    check_ndim,
    check_positive_int,
    check_shape,
    namespace,
)

__all__ = [
    "from_flax_dense",
    "from_flax_experts",
    "from_tf_flat_depthwise_experts",
    "from_tf_flat_experts",
    "from_torch_flat_experts",
    "to_channels_first",
    "to_channels_last",
    "to_flax_dense",
    "to_flax_experts",
    "to_tf_flat_depthwise_experts",
    "to_tf_flat_experts",
    "to_torch_flat_experts",
]


def _experts(fn: str, experts: Any, layout: str,
             ndims: tuple[int, ...] = (4, 5, 6)) -> tuple[Any, Any]:
    experts = any_array(fn, "experts", experts)
    xp = namespace(fn, experts=experts)
    check_ndim(fn, "experts", experts, ndims, layout)
    return xp, experts


def _kernel_shape(fn: str, kernel_shape: Sequence[int], least: int = 3) -> tuple[int, ...]:
    shape = tuple(kernel_shape)
    if not least <= len(shape) <= 5:
        raise ValueError(f"{fn}: kernel_shape must have {least} to 5 entries (O, C/groups, *k), "
                         f"got {shape!r}")
    return tuple(check_positive_int(fn, "kernel_shape", n) for n in shape)


def _flat(fn: str, flat: Any, size: int, described: str) -> tuple[Any, Any]:
    flat = any_array(fn, "flat", flat)
    xp = namespace(fn, flat=flat)
    check_ndim(fn, "flat", flat, 2, "(E, size)")
    check_shape(fn, "flat", flat, (flat.shape[0], size), described)
    return xp, flat


# ---------------------------------------------------------------- PyTorch flattened OIHW


def to_torch_flat_experts(experts: Any) -> Any:
    r"""Experts (E, O, C/g, \*k) as PyTorch's flattened OIHW storage (E, O·C/g·\*k).

    Row ``e`` is expert ``e``'s kernel in C order, so
    ``flat[e].reshape(O, C/g, *k)`` is that kernel: the layout of timm's
    ``CondConv2d`` and of the grouped-conv batch trick, where
    ``routing @ flat`` is viewed as (B·O, C/g, \*k).  Linear experts
    (E, F_out, F_in) flatten the same way, to (E, F_out·F_in).

    Examples
    --------
    >>> import numpy as np
    >>> experts = np.arange(24.0).reshape(2, 3, 2, 2)
    >>> to_torch_flat_experts(experts)[1, :5]
    array([12., 13., 14., 15., 16.])
    """
    fn = "to_torch_flat_experts"
    xp, experts = _experts(fn, experts, "(E, O, C/groups, *k) or (E, F_out, F_in)", (3, 4, 5, 6))
    return xp.reshape(experts, (experts.shape[0], math.prod(experts.shape[1:])))


def from_torch_flat_experts(flat: Any, kernel_shape: Sequence[int]) -> Any:
    r"""Inverse of :func:`to_torch_flat_experts`: (E, O·C/g·\*k) to (E, O, C/g, \*k).

    Parameters
    ----------
    flat : array, shape (E, O·C/g·\*k)
    kernel_shape : sequence of int
        One expert's shape in the reference's layout, (O, C/g, \*k), or
        (F_out, F_in) for linear experts.

    Examples
    --------
    >>> import numpy as np
    >>> experts = np.arange(24.0).reshape(2, 3, 2, 2)
    >>> bool(np.all(from_torch_flat_experts(to_torch_flat_experts(experts), (3, 2, 2)) == experts))
    True
    """
    fn = "from_torch_flat_experts"
    shape = _kernel_shape(fn, kernel_shape, least=2)
    xp, flat = _flat(fn, flat, math.prod(shape), f"(E, O·C/g·*k) for kernel_shape {shape}")
    return xp.reshape(flat, (flat.shape[0],) + shape)


# ---------------------------------------------------------------- spatial-first kernels


def _spatial_first(xp: Any, experts: Any) -> Any:
    r"""(E, O, C/g, \*k) to (E, \*k, C/g, O)."""
    nd = experts.ndim - 3
    return xp.permute_dims(experts, (0,) + tuple(range(3, 3 + nd)) + (2, 1))


def _channels_first(xp: Any, kernels: Any) -> Any:
    r"""(E, \*k, C/g, O) to (E, O, C/g, \*k): the inverse of :func:`_spatial_first`."""
    nd = kernels.ndim - 3
    return xp.permute_dims(kernels, (0, nd + 2, nd + 1) + tuple(range(1, nd + 1)))


def to_flax_experts(experts: Any) -> Any:
    r"""Experts (E, O, C/g, \*k) as Flax ``Conv`` kernels stacked per expert, (E, \*k, C/g, O).

    Expert ``e`` becomes ``kernels[e]``, a kernel in the spatial-first layout of
    ``flax.linen.Conv`` and of ``jax.lax.conv_general_dilated`` with
    ``dimension_numbers=("NHWC", "HWIO", "NHWC")`` (``"NWC", "WIO", "NWC"``
    in 1-D): the layout a JAX CondConv layer keeps its experts in when it mixes
    them with ``jnp.tensordot(routing, kernels, axes=1)``.  Depthwise experts
    (E, C·m, 1, \*k) become (E, \*k, 1, C·m), the kernels of
    ``feature_group_count=C``.  Unlike :func:`to_tf_flat_experts`, the kernel's
    shape is kept.

    Examples
    --------
    >>> import numpy as np
    >>> experts = np.arange(2 * 4 * 3 * 5 * 6.0).reshape(2, 4, 3, 5, 6)  # E=2, O=4, C=3, 5x6
    >>> kernels = to_flax_experts(experts)
    >>> kernels.shape
    (2, 5, 6, 3, 4)
    >>> bool(kernels[1, 2, 0, 1, 3] == experts[1, 3, 1, 2, 0])
    True
    """
    fn = "to_flax_experts"
    xp, experts = _experts(fn, experts, "(E, O, C/groups, *k)")
    return _spatial_first(xp, experts)


def from_flax_experts(kernels: Any) -> Any:
    r"""Inverse of :func:`to_flax_experts`: (E, \*k, C/g, O) to (E, O, C/g, \*k).

    Examples
    --------
    >>> import numpy as np
    >>> experts = np.arange(24.0).reshape(1, 2, 3, 4)  # E=1, O=2, C=3, k=4
    >>> bool(np.all(from_flax_experts(to_flax_experts(experts)) == experts))
    True
    """
    fn = "from_flax_experts"
    kernels = any_array(fn, "kernels", kernels)
    xp = namespace(fn, kernels=kernels)
    check_ndim(fn, "kernels", kernels, (4, 5, 6), "(E, *k, C/groups, O)")
    return _channels_first(xp, kernels)


# ---------------------------------------------------------------- Flax Dense


def _dense(fn: str, name: str, weight: Any, layout: str) -> Any:
    """``weight`` with its last two axes swapped, after checking it has 2 or 3 dims."""
    weight = any_array(fn, name, weight)
    xp = namespace(fn, **{name: weight})
    check_ndim(fn, name, weight, (2, 3), layout)
    return xp.permute_dims(weight, tuple(range(weight.ndim - 2)) + (weight.ndim - 1,
                                                                    weight.ndim - 2))


def to_flax_dense(weight: Any) -> Any:
    r"""A weight of the reference, (out, in), as a Flax ``Dense`` kernel, (in, out).

    The reference stores a linear map as PyTorch's ``nn.Linear`` does,
    ``y = x W^\top``: the routing's ``route_weight`` (E, C), DynamicConv's
    ``fc1_weight`` and ``fc2_weight``.  ``flax.linen.Dense`` computes
    ``y = x K`` with ``K`` (in, out), the transpose.  Stacked weights
    (E, out, in), such as the experts of ``cond_linear_layer`` (E, F_out, F_in),
    become (E, in, out).

    Examples
    --------
    >>> import numpy as np
    >>> route_weight = np.arange(6.0).reshape(3, 2)  # E=3, C=2
    >>> to_flax_dense(route_weight)
    array([[0., 2., 4.],
           [1., 3., 5.]])
    >>> to_flax_dense(np.zeros((4, 5, 6))).shape
    (4, 6, 5)
    """
    return _dense("to_flax_dense", "weight", weight, "(out, in) or (E, out, in)")


def from_flax_dense(kernel: Any) -> Any:
    r"""Inverse of :func:`to_flax_dense`: a ``Dense`` kernel (in, out), or (E, in, out), as
    the reference's (out, in), or (E, out, in).

    Examples
    --------
    >>> import numpy as np
    >>> route_weight = np.arange(6.0).reshape(3, 2)
    >>> bool(np.all(from_flax_dense(to_flax_dense(route_weight)) == route_weight))
    True
    """
    return _dense("from_flax_dense", "kernel", kernel, "(in, out) or (E, in, out)")


# ---------------------------------------------------------------- TensorFlow flattened HWIO


def to_tf_flat_experts(experts: Any) -> Any:
    r"""Experts (E, O, C/g, \*k) as TensorFlow's flattened HWIO storage (E, \*k·C/g·O).

    Row ``e`` is expert ``e``'s kernel in TensorFlow's ``(*k, C/g, O)``
    order, flattened: what ``CondConv2D`` keeps in ``condconv_kernel`` and
    reshapes per example with ``tf.reshape(kernel, kernel_size + (C, filters))``.

    Examples
    --------
    >>> import numpy as np
    >>> experts = np.arange(12.0).reshape(1, 2, 3, 2)  # E=1, O=2, C=3, k=2
    >>> to_tf_flat_experts(experts)
    array([[ 0.,  6.,  2.,  8.,  4., 10.,  1.,  7.,  3.,  9.,  5., 11.]])
    """
    fn = "to_tf_flat_experts"
    xp, experts = _experts(fn, experts, "(E, O, C/groups, *k)")
    hwio = _spatial_first(xp, experts)
    return xp.reshape(hwio, (experts.shape[0], math.prod(experts.shape[1:])))


def from_tf_flat_experts(flat: Any, kernel_shape: Sequence[int]) -> Any:
    r"""Inverse of :func:`to_tf_flat_experts`: (E, \*k·C/g·O) to (E, O, C/g, \*k).

    Parameters
    ----------
    flat : array, shape (E, \*k·C/g·O)
    kernel_shape : sequence of int
        One expert's shape in the reference's layout, (O, C/g, \*k) (not
        TensorFlow's ``(*k, C/g, O)``).

    Examples
    --------
    >>> import numpy as np
    >>> flat = np.arange(12.0).reshape(1, 12)
    >>> from_tf_flat_experts(flat, (2, 3, 2))[0, 1]
    array([[ 1.,  7.],
           [ 3.,  9.],
           [ 5., 11.]])
    """
    fn = "from_tf_flat_experts"
    shape = _kernel_shape(fn, kernel_shape)
    xp, flat = _flat(fn, flat, math.prod(shape), f"(E, *k·C/g·O) for kernel_shape {shape}")
    out_channels, in_per_group, spatial = shape[0], shape[1], shape[2:]
    hwio = xp.reshape(flat, (flat.shape[0],) + spatial + (in_per_group, out_channels))
    return _channels_first(xp, hwio)


# ---------------------------------------------------------------- TensorFlow flattened depthwise


def to_tf_flat_depthwise_experts(experts: Any, *, depth_multiplier: int) -> Any:
    r"""Depthwise experts (E, C·m, 1, \*k) as TensorFlow's flattened storage (E, \*k·C·m).

    Row ``e`` is expert ``e``'s ``depthwise_conv2d`` kernel, shape
    ``(*k, C, m)``, flattened: what ``DepthwiseCondConv2D`` keeps in
    ``depthwise_condconv_kernel``.  The reference's output channel ``c·m + j``
    is TensorFlow's ``[..., c, j]``.

    Examples
    --------
    >>> import numpy as np
    >>> experts = np.arange(8.0).reshape(1, 4, 1, 2)  # E=1, C=2, m=2, k=2
    >>> to_tf_flat_depthwise_experts(experts, depth_multiplier=2)
    array([[0., 2., 4., 6., 1., 3., 5., 7.]])
    """
    fn = "to_tf_flat_depthwise_experts"
    xp, experts = _experts(fn, experts, "(E, C·m, 1, *k)")
    m = check_positive_int(fn, "depth_multiplier", depth_multiplier)
    n_experts, out_channels, nd = experts.shape[0], experts.shape[1], experts.ndim - 3
    if experts.shape[2] != 1 or out_channels % m:
        raise ValueError(f"{fn}: experts has shape {tuple(experts.shape)}, expected "
                         f"(E, C·m, 1, *k) with C·m a multiple of depth_multiplier={m}")
    split = xp.reshape(experts, (n_experts, out_channels // m, m) + tuple(experts.shape[3:]))
    tf_order = xp.permute_dims(split, (0,) + tuple(range(3, 3 + nd)) + (1, 2))
    return xp.reshape(tf_order, (n_experts, math.prod(experts.shape[1:])))


def from_tf_flat_depthwise_experts(flat: Any, kernel_shape: Sequence[int], *,
                                   depth_multiplier: int) -> Any:
    r"""Inverse of :func:`to_tf_flat_depthwise_experts`: (E, \*k·C·m) to (E, C·m, 1, \*k).

    Parameters
    ----------
    flat : array, shape (E, \*k·C·m)
    kernel_shape : sequence of int
        One expert's shape in the reference's layout, (C·m, 1, \*k).
    depth_multiplier : int, keyword-only
        m.

    Examples
    --------
    >>> import numpy as np
    >>> flat = np.array([[0., 2., 4., 6., 1., 3., 5., 7.]])
    >>> from_tf_flat_depthwise_experts(flat, (4, 1, 2), depth_multiplier=2)[0, :, 0]
    array([[0., 1.],
           [2., 3.],
           [4., 5.],
           [6., 7.]])
    """
    fn = "from_tf_flat_depthwise_experts"
    shape = _kernel_shape(fn, kernel_shape)
    m = check_positive_int(fn, "depth_multiplier", depth_multiplier)
    if shape[1] != 1 or shape[0] % m:
        raise ValueError(f"{fn}: kernel_shape must be (C·m, 1, *k) with C·m a multiple of "
                         f"depth_multiplier={m}, got {shape}")
    xp, flat = _flat(fn, flat, math.prod(shape), f"(E, *k·C·m) for kernel_shape {shape}")
    spatial, nd = shape[2:], len(shape) - 2
    tf_order = xp.reshape(flat, (flat.shape[0],) + spatial + (shape[0] // m, m))
    split = xp.permute_dims(tf_order, (0, nd + 1, nd + 2) + tuple(range(1, nd + 1)))
    return xp.reshape(split, (flat.shape[0],) + shape)


# ---------------------------------------------------------------- channels-last


def to_channels_last(x: Any) -> Any:
    r"""(B, C, \*spatial) to (B, \*spatial, C), for 1 to 3 spatial dims.

    Examples
    --------
    >>> import numpy as np
    >>> to_channels_last(np.zeros((2, 3, 4, 5))).shape
    (2, 4, 5, 3)
    """
    fn = "to_channels_last"
    x = any_array(fn, "x", x)
    xp = namespace(fn, x=x)
    check_ndim(fn, "x", x, (3, 4, 5), "(B, C, *spatial) with 1 to 3 spatial dims")
    return xp.moveaxis(x, 1, -1)


def to_channels_first(x: Any) -> Any:
    r"""(B, \*spatial, C) to (B, C, \*spatial): the inverse of :func:`to_channels_last`.

    Examples
    --------
    >>> import numpy as np
    >>> to_channels_first(np.zeros((2, 4, 5, 3))).shape
    (2, 3, 4, 5)
    """
    fn = "to_channels_first"
    x = any_array(fn, "x", x)
    xp = namespace(fn, x=x)
    check_ndim(fn, "x", x, (3, 4, 5), "(B, *spatial, C) with 1 to 3 spatial dims")
    return xp.moveaxis(x, -1, 1)
