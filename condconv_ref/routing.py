r"""Routing functions: example-dependent expert weights computed from the input.

``route_sigmoid`` is CondConv's routing (Yang et al., 2019): global average
pooling, a fully-connected layer, a sigmoid.  ``route_softmax`` is Dynamic
Convolution's (Chen et al., 2020): global average pooling, a squeeze-and-excite
pair of fully-connected layers with a ReLU between them, and a softmax over the
experts at a temperature.

Each op resolves the namespace and validates its arguments once, then runs
the routing math of :mod:`condconv_ref._routing` on the validated arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from condconv_ref._routing import (
    check_softmax_routing,
    global_average_pool,
    routing_memory,
    sigmoid_routing,
    sigmoid_routing_jvp,
    sigmoid_routing_vjp,
    softmax_routing,
    softmax_routing_jvp,
    softmax_routing_vjp,
)
from condconv_ref._tangent import total
from condconv_ref._validate import (
    check_ndim,
    check_nonempty,
    check_shape,
    check_tangent_shapes,
    itemsize,
    namespace,
    public_op,
    tangent_namespace,
)
from condconv_ref.memory import check_memory

__all__ = [
    "global_average_pool",
    "route_sigmoid",
    "route_sigmoid_jvp",
    "route_sigmoid_vjp",
    "route_softmax",
    "route_softmax_jvp",
    "route_softmax_vjp",
]


def _check_route_sigmoid(fn: str, x: Any, weight: Any, bias: Any, cotangent: Any = None, *,
                         xp: ModuleType) -> None:
    """Validate a :func:`route_sigmoid` (``cotangent``: :func:`route_sigmoid_vjp`) call."""
    check_ndim(fn, "x", x, (2, 3, 4, 5), "(B, C) or (B, C, *spatial) with 1 to 3 spatial dims")
    check_ndim(fn, "weight", weight, 2, "(E, C)")
    channels = x.shape[1]
    experts = weight.shape[0]
    if experts < 1:
        raise ValueError(f"{fn}: weight has E={experts} experts, expected E >= 1")
    check_shape(fn, "weight", weight, (experts, channels), f"(E, C) with C={channels} from x")
    if bias is not None:
        check_shape(fn, "bias", bias, (experts,), "(E,)")
    if cotangent is not None:
        check_shape(fn, "cotangent", cotangent, (x.shape[0], experts), "(B, E), the output shape")
    check_nonempty(fn, x=x, weight=weight, bias=bias)
    check_memory(fn, itemsize(x, xp=xp), routing_memory(x, experts, vjp=cotangent is not None,
                                                        parameters=experts * (channels + 1)))


@public_op
def route_sigmoid(x: Any, weight: Any, bias: Any = None) -> Any:
    r"""CondConv routing weights :math:`\alpha = \sigma(\bar x R^\top + r)`.

    Parameters
    ----------
    x : array, shape (B, C, \*spatial) or (B, C)
        Layer input; :math:`\bar x` is its mean over the spatial axes (a 2-D
        ``x`` has none, and is used as it is).
    weight : array, shape (E, C)
        Routing matrix :math:`R`, one row per expert.
    bias : array, shape (E,), optional
        Routing bias :math:`r`.

    Returns
    -------
    array, shape (B, E)
        Each entry in (0, 1); computed without overflow for any finite logit.

    Notes
    -----
    Forward: :math:`z = \bar x R^\top + r`, :math:`\alpha = \sigma(z)`.
    Backward, with :math:`\sigma'(z) = \sigma(z)(1-\sigma(z))`:

    .. math::

        \bar z = \bar\alpha \odot \sigma'(z),\quad
        \bar R = \bar z^\top \bar x,\quad
        \bar r = \textstyle\sum_b \bar z_b,\quad
        \bar{\bar x} = \bar z R,\quad
        \bar x_{b,c,p} = \bar{\bar x}_{b,c} / P,

    where :math:`P` is the number of spatial positions (pooling spreads the
    gradient evenly).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import route_sigmoid
    >>> route_sigmoid(np.zeros((1, 2, 4, 4)), np.ones((3, 2)))
    array([[0.5, 0.5, 0.5]])
    """
    xp = namespace("route_sigmoid", x=x, weight=weight, bias=bias)
    _check_route_sigmoid("route_sigmoid", x, weight, bias, xp=xp)
    return sigmoid_routing(x, weight, bias, xp=xp)



@public_op
def route_sigmoid_vjp(cotangent: Any, x: Any, weight: Any, bias: Any = None) -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`route_sigmoid`.

    Returns
    -------
    dict
        ``{"x": ..., "weight": ...}`` plus ``"bias"`` when ``bias`` is given.
        The derivation is in :func:`route_sigmoid`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import route_sigmoid_vjp
    >>> grads = route_sigmoid_vjp(np.ones((1, 1)), np.zeros((1, 2, 2)), np.ones((1, 2)))
    >>> grads["weight"], grads["x"]
    (array([[0., 0.]]), array([[[0.125, 0.125],
            [0.125, 0.125]]]))
    """
    xp = namespace("route_sigmoid_vjp", x=x, weight=weight, bias=bias, cotangent=cotangent)
    _check_route_sigmoid("route_sigmoid_vjp", x, weight, bias, cotangent, xp=xp)
    return sigmoid_routing_vjp(cotangent, x, weight, bias, xp=xp)


@public_op
def route_sigmoid_jvp(tangents: Mapping[str, Any], x: Any, weight: Any, bias: Any = None) -> Any:
    r"""Jacobian-vector product of :func:`route_sigmoid`: the routing's derivative along ``tangents``.

    Parameters
    ----------
    tangents : mapping
        Any of ``"x"``, ``"weight"`` and (when ``bias`` is given) ``"bias"``,
        the keys of :func:`route_sigmoid_vjp`, each with the shape of its
        argument; a missing key is a zero tangent.
    x, weight, bias
        Exactly the arguments given to :func:`route_sigmoid`.

    Returns
    -------
    array, shape (B, E)

    Notes
    -----
    Pooling and the affine map are linear in each argument, so the logits'
    tangent is :math:`\dot z = \mathrm{GAP}(\dot x) R^\top + \bar x \dot R^\top + \dot r`,
    and the sigmoid acts elementwise:

    .. math::

        \dot\alpha = \sigma'(z) \odot \dot z,

    with :math:`\sigma'(z) = e/(1+e)^2`, :math:`e = \exp(-|z|)`, the
    overflow-free form the VJP uses.  The Jacobian of the sigmoid is
    diagonal, so the VJP's :math:`\bar z = \bar\alpha\odot\sigma'(z)` is its
    transpose, and transposing the affine map and the pooling gives the rest
    of :func:`route_sigmoid_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import route_sigmoid_jvp
    >>> route_sigmoid_jvp({"bias": np.ones(3)}, np.zeros((1, 2, 4, 4)), np.ones((3, 2)),
    ...                   np.zeros(3))
    array([[0.25, 0.25, 0.25]])
    """
    fn = "route_sigmoid_jvp"
    arrays = {"x": x, "weight": weight, "bias": bias}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    _check_route_sigmoid(fn, x, weight, bias, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    tangent = sigmoid_routing_jvp(tangents, x, weight, bias, xp=xp)
    return total([] if tangent is None else [tangent], (x.shape[0], weight.shape[0]), x, xp=xp)



@public_op
def route_softmax(x: Any, fc1_weight: Any, fc2_weight: Any, fc1_bias: Any = None,
                  fc2_bias: Any = None, *, temperature: float = 1.0) -> Any:
    r"""Dynamic Convolution routing: a softmax over the experts at temperature :math:`T`.

    .. math::

        h = \mathrm{relu}(\bar x W_1^\top + b_1),\qquad
        z = h W_2^\top + b_2,\qquad
        \alpha = \mathrm{softmax}(z / T)

    along the expert axis (Chen et al., CVPR 2020: the squeeze-and-excitation
    attention with its sigmoid replaced by a softmax).  Every row of
    :math:`\alpha` is positive and sums to 1; as :math:`T \to \infty` it tends to
    the uniform :math:`1/E`, and as :math:`T \to 0` to one-hot on the largest
    logit.

    Parameters
    ----------
    x : array, shape (B, C, \*spatial) or (B, C)
        Layer input; :math:`\bar x` is its mean over the spatial axes (a 2-D
        ``x`` has none, and is used as it is).
    fc1_weight : array, shape (H, C)
        :math:`W_1`, the squeeze layer; the hidden width H must be >= 1.
    fc2_weight : array, shape (E, H)
        :math:`W_2`, one row per expert.
    fc1_bias : array, shape (H,), optional
        :math:`b_1`.
    fc2_bias : array, shape (E,), optional
        :math:`b_2`.
    temperature : float, keyword-only
        :math:`T`, finite and > 0 (``ValueError`` otherwise).

    Returns
    -------
    array, shape (B, E)

    Notes
    -----
    *Stability.*  The softmax shifts the logits by their row maximum before
    dividing by :math:`T` (see :func:`stable_softmax`), so it neither overflows
    nor warns for logits of any size whose differences divided by :math:`T` are
    finite; e.g. logits :math:`\pm 10^4` with :math:`T = 10^{-3}` in float32.

    *Backward.*  With the softmax Jacobian
    :math:`\partial\alpha/\partial z = (\mathrm{diag}\,\alpha - \alpha\alpha^\top)/T`,

    .. math::

        \bar z = \alpha \odot (\bar\alpha - \langle\bar\alpha, \alpha\rangle) / T,\quad
        \bar W_2 = \bar z^\top h,\quad \bar b_2 = \textstyle\sum_b \bar z_b,\quad
        \bar u = (\bar z W_2) \odot [u > 0],

    where :math:`u = \bar x W_1^\top + b_1` is the pre-activation, then
    :math:`\bar W_1 = \bar u^\top \bar x`, :math:`\bar b_1 = \sum_b \bar u_b`,
    :math:`\bar{\bar x} = \bar u W_1` and
    :math:`\bar x_{b,c,p} = \bar{\bar x}_{b,c} / P` over the :math:`P` spatial
    positions.  The ReLU derivative at exactly :math:`u = 0` is taken as 0, the
    convention of PyTorch, TensorFlow and JAX; finite differences disagree only
    at such kinks.  :math:`T` is a hyper-parameter and gets no gradient.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import route_softmax
    >>> route_softmax(np.zeros((1, 2, 4, 4)), np.ones((3, 2)), np.ones((4, 3)))
    array([[0.25, 0.25, 0.25, 0.25]])

    Logits of :math:`\pm 10^4` stay finite; a high temperature softens them:

    >>> x, fc1, fc2 = np.array([[1e4]]), np.array([[1.0]]), np.array([[1.0], [-1.0]])
    >>> route_softmax(x, fc1, fc2)
    array([[1., 0.]])
    >>> route_softmax(x, fc1, fc2, temperature=1e4).round(4)
    array([[0.8808, 0.1192]])
    """
    fn = "route_softmax"
    xp = namespace(fn, x=x, fc1_weight=fc1_weight, fc2_weight=fc2_weight, fc1_bias=fc1_bias,
                   fc2_bias=fc2_bias)
    temperature = check_softmax_routing(fn, x, fc1_weight, fc2_weight, fc1_bias, fc2_bias,
                                        temperature, xp=xp)
    return softmax_routing(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, temperature,
                           xp=xp).routing


@public_op
def route_softmax_vjp(cotangent: Any, x: Any, fc1_weight: Any, fc2_weight: Any,
                      fc1_bias: Any = None, fc2_bias: Any = None, *,
                      temperature: float = 1.0) -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`route_softmax`.

    Returns
    -------
    dict
        ``{"x", "fc1_weight", "fc2_weight"}`` plus ``"fc1_bias"`` / ``"fc2_bias"``
        when given; the temperature is not differentiated.  The derivation is in
        :func:`route_softmax`.

    Examples
    --------
    A cotangent that is constant over the experts has zero gradient, because
    the routing always sums to 1:

    >>> import numpy as np
    >>> from condconv_ref import route_softmax_vjp
    >>> rng = np.random.default_rng(0)
    >>> x, fc1, fc2 = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 3)), rng.normal(size=(4, 5))
    >>> grads = route_softmax_vjp(np.ones((2, 4)), x, fc1, fc2, temperature=0.5)
    >>> sorted(grads), bool(np.allclose(grads["x"], 0.0))
    (['fc1_weight', 'fc2_weight', 'x'], True)
    """
    fn = "route_softmax_vjp"
    xp = namespace(fn, x=x, fc1_weight=fc1_weight, fc2_weight=fc2_weight, fc1_bias=fc1_bias,
                   fc2_bias=fc2_bias, cotangent=cotangent)
    temperature = check_softmax_routing(fn, x, fc1_weight, fc2_weight, fc1_bias, fc2_bias,
                                        temperature, cotangent, xp=xp)
    forward = softmax_routing(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, temperature, xp=xp)
    return softmax_routing_vjp(cotangent, tuple(x.shape), fc1_weight, fc2_weight, fc1_bias,
                              fc2_bias, forward, temperature, xp=xp)


@public_op
def route_softmax_jvp(tangents: Mapping[str, Any], x: Any, fc1_weight: Any, fc2_weight: Any,
                      fc1_bias: Any = None, fc2_bias: Any = None, *,
                      temperature: float = 1.0) -> Any:
    r"""Jacobian-vector product of :func:`route_softmax`: the routing's derivative along ``tangents``.

    Parameters
    ----------
    tangents : mapping
        Any of ``"x"``, ``"fc1_weight"``, ``"fc2_weight"`` and the biases
        given, the keys of :func:`route_softmax_vjp`, each with the shape of
        its argument; a missing key is a zero tangent.  :math:`T` has none.
    x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, temperature
        Exactly the arguments given to :func:`route_softmax`.

    Returns
    -------
    array, shape (B, E)

    Notes
    -----
    Step by step through the forward, each linear step applied to the
    tangents and each nonlinear one linearised at the forward's values:

    .. math::

        \dot u = \mathrm{GAP}(\dot x) W_1^\top + \bar x\dot W_1^\top + \dot b_1,\quad
        \dot h = [u > 0] \odot \dot u,\quad
        \dot z = \dot h W_2^\top + h \dot W_2^\top + \dot b_2,

    .. math::

        \dot\alpha = \alpha \odot (\dot z - \langle \dot z, \alpha\rangle) / T,

    the softmax's Jacobian :math:`(\mathrm{diag}\,\alpha - \alpha\alpha^\top)/T`
    applied to :math:`\dot z`.  That Jacobian is symmetric, so the same
    function computes it as in the VJP, including its shift by the entry at
    the largest weight (exact, as the rows sum to zero) that keeps a saturated
    softmax accurate.  The ReLU's derivative at :math:`u = 0` is 0, as in the
    VJP.  Transposing each step gives :func:`route_softmax_vjp`.

    Examples
    --------
    A tangent shared by every logit leaves a softmax unchanged:

    >>> import numpy as np
    >>> from condconv_ref import route_softmax_jvp
    >>> x, fc1, fc2 = np.ones((1, 2, 3)), np.ones((4, 2)), np.ones((3, 4))
    >>> route_softmax_jvp({"fc2_bias": np.ones(3)}, x, fc1, fc2, fc2_bias=np.zeros(3))
    array([[0., 0., 0.]])
    >>> route_softmax_jvp({"fc2_bias": np.array([3.0, 0.0, 0.0])}, x, fc1, fc2,
    ...                   fc2_bias=np.zeros(3))
    array([[ 0.66666667, -0.33333333, -0.33333333]])
    """
    fn = "route_softmax_jvp"
    arrays = {"x": x, "fc1_weight": fc1_weight, "fc2_weight": fc2_weight, "fc1_bias": fc1_bias,
              "fc2_bias": fc2_bias}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    temperature = check_softmax_routing(fn, x, fc1_weight, fc2_weight, fc1_bias, fc2_bias,
                                        temperature, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    forward = softmax_routing(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, temperature, xp=xp)
    tangent = softmax_routing_jvp(tangents, fc1_weight, fc2_weight, forward, temperature, xp=xp)
    return total([] if tangent is None else [tangent], tuple(forward.routing.shape), x, xp=xp)
