r"""Linear (fully-connected) CondConv: the op, its mixture-of-experts form, the layer.

Shapes: ``x`` (B, F_in), ``experts`` (E, F_out, F_in), ``bias`` (E, F_out),
``routing`` (B, E); the output is (B, F_out).  For each example :math:`b`,

.. math::

    y_b = \Big(\sum_e \alpha_{be} W_e\Big) x_b + \sum_e \alpha_{be}\,\beta_e
        = \sum_e \alpha_{be}\,(W_e x_b + \beta_e).

Two exact ways to compute it, chosen by cost:

* **mixed weights**: :math:`M_b = \sum_e \alpha_{be} W_e` for every example,
  then one matrix-vector product per example.  The big matmul contracts over
  the E experts and its result holds B·F_out·F_in numbers.
* **shared matmuls**: the E experts stacked into one (E·F_out, F_in) matrix
  and applied to the whole batch, :math:`z_{be} = W_e x_b`, then weighted by
  the routing, :math:`y_b = \sum_e \alpha_{be} z_{be}`.  The big matmul
  contracts over the F_in features and its result holds B·E·F_out numbers.

Both forms do the same B·E·F_out·F_in multiply-adds, so the rule is:
**shared matmuls when E <= F_in, mixed weights otherwise.**  The intermediate
is then the smaller one (E·F_out against F_out·F_in per example), and the
matmul has the longer inner dimension, which keeps BLAS efficient.  At B=256,
1280 -> 1000, E=8 the mixed weights take 1.2 GiB in float32 against 8 MiB of
expert outputs, and the shared form is about 10x faster (forward, and forward
plus VJP); at B=256, E=32, F_in=16 the mixed form is about 2x faster.
Measured on one CPU core, the forward crosses over at E = F_in and the VJP
between F_in = E and F_in = 2E, so near the boundary the rule costs at most
about 1.5x.  The VJP follows the same rule; each form has its own
hand-derived VJP (see :func:`cond_linear`), and the tests check that the two
forms agree with each other and with finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from condconv_ref._layer import SIGMOID, layer, layer_hvp, layer_jvp, layer_params, layer_vjp
from condconv_ref._mixing import mix, mix_vjp
from condconv_ref._routing import affine, affine_jvp, affine_vjp
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
    "cond_linear",
    "cond_linear_jvp",
    "cond_linear_layer",
    "cond_linear_layer_hvp",
    "cond_linear_layer_jvp",
    "cond_linear_layer_vjp",
    "cond_linear_vjp",
    "moe_cond_linear",
    "moe_cond_linear_jvp",
    "moe_cond_linear_vjp",
]


# ---------------------------------------------------------------- validation


def _check_operands(fn: str, x: Any, experts: Any, bias: Any) -> None:
    """x (B, F_in), experts (E, F_out, F_in) with E >= 1, bias (E, F_out)."""
    check_ndim(fn, "x", x, 2, "(B, F_in)")
    check_ndim(fn, "experts", experts, 3, "(E, F_out, F_in)")
    n_experts, out_features, _ = experts.shape
    if n_experts < 1:
        raise ValueError(f"{fn}: experts has E={n_experts}, expected E >= 1")
    check_shape(fn, "experts", experts, (n_experts, out_features, x.shape[1]),
                f"(E, F_out, F_in) with F_in={x.shape[1]} from x")
    if bias is not None:
        check_shape(fn, "bias", bias, (n_experts, out_features), "(E, F_out)")


def _check_cotangent(fn: str, cotangent: Any, x: Any, experts: Any) -> None:
    if cotangent is not None:
        check_ndim(fn, "cotangent", cotangent, 2, "(B, F_out), the output shape")
        check_shape(fn, "cotangent", cotangent, (x.shape[0], experts.shape[1]),
                    "(B, F_out), the output shape")


def _check_cond_linear(fn: str, x: Any, experts: Any, routing: Any, bias: Any,
                       cotangent: Any = None, *, xp: ModuleType) -> None:
    """Validate a :func:`cond_linear` (``cotangent``: its VJP) call, or of its MoE form."""
    _check_operands(fn, x, experts, bias)
    check_ndim(fn, "routing", routing, 2, "(B, E)")
    check_shape(fn, "routing", routing, (x.shape[0], experts.shape[0]),
                f"(B, E) with B={x.shape[0]} from x and E={experts.shape[0]} from experts")
    _check_cotangent(fn, cotangent, x, experts)
    check_nonempty(fn, x=x, experts=experts, routing=routing, bias=bias)
    check_memory(fn, itemsize(x, xp=xp), _working_memory(x, experts, vjp=cotangent is not None))


def _working_memory(x: Any, experts: Any, *, vjp: bool) -> dict[str, int]:
    """Elements of the largest arrays of the form :func:`_uses_shared_matmuls` picks."""
    batch, (n_experts, out_features, in_features) = x.shape[0], experts.shape
    if _uses_shared_matmuls(experts):
        parts = {"expert outputs (B, E, F_out)": batch * n_experts * out_features}
    else:
        parts = {"mixed weights (B, F_out, F_in)": batch * out_features * in_features}
    parts["output"] = batch * out_features
    if vjp:  # the forward's intermediates and their gradients
        parts = {name: 2 * count for name, count in parts.items()}
        # the experts' gradient, and the per-expert gradients stacked into it (MoE form)
        parts["experts and x gradients"] = 2 * math.prod(experts.shape) + math.prod(x.shape)
        if _uses_shared_matmuls(experts):  # u = W_eᵀ ȳ_b and one product of it at a time
            parts["W_eᵀ ȳ_b and its products (E, B, F_in)"] = (
                2 * n_experts * batch * in_features)
    return parts


# ---------------------------------------------------------------- the two forms


def _uses_shared_matmuls(experts: Any) -> bool:
    """The selection rule: shared matmuls when E <= F_in, mixed weights otherwise."""
    n_experts, _, in_features = experts.shape
    return n_experts <= in_features


def _add_mixed_bias(y: Any, routing: Any, bias: Any) -> Any:
    """y + α β: the routing-mixed bias, (B, E) @ (E, F_out)."""
    return y if bias is None else y + routing @ bias


def _with_bias_grads(grads: dict[str, Any], cotangent: Any, routing: Any, bias: Any, *,
                     xp: ModuleType) -> dict[str, Any]:
    """Add the bias term's share: β̄ = αᵀ ȳ and ᾱ_be += ⟨ȳ_b, β_e⟩."""
    if bias is not None:
        grads["routing"] = grads["routing"] + cotangent @ xp.matrix_transpose(bias)
        grads["bias"] = xp.matrix_transpose(routing) @ cotangent
    return grads


def _expert_outputs(x: Any, experts: Any, *, xp: ModuleType) -> Any:
    """z_be = W_e x_b for every expert at once: one matmul, shaped (B, E, F_out)."""
    n_experts, out_features, in_features = experts.shape
    stacked = xp.reshape(experts, (n_experts * out_features, in_features))
    return xp.reshape(x @ xp.matrix_transpose(stacked), (x.shape[0], n_experts, out_features))


def _cond_linear_shared(x: Any, experts: Any, routing: Any, bias: Any, *,
                        xp: ModuleType) -> Any:
    """Shared-matmul form: y_b = Σ_e α_be z_be, a (1, E) @ (E, F_out) product per example."""
    batch, n_experts = routing.shape
    outputs = _expert_outputs(x, experts, xp=xp)
    y = xp.reshape(xp.reshape(routing, (batch, 1, n_experts)) @ outputs,
                   (batch, experts.shape[1]))
    return _add_mixed_bias(y, routing, bias)


def _cond_linear_shared_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any, *,
                            xp: ModuleType) -> dict[str, Any]:
    batch, n_experts = routing.shape
    _, out_features, in_features = experts.shape
    # u_eb = W_eᵀ ȳ_b for every expert, (E, B, F_in): one batched matmul serves x̄ and ᾱ.
    back = xp.reshape(cotangent, (1, batch, out_features)) @ experts
    per_expert = xp.reshape(xp.matrix_transpose(routing), (n_experts, batch, 1))
    # z̄_be = α_be ȳ_b, the cotangent of the stacked expert outputs, as (B, E·F_out).
    grad_outputs = xp.reshape(routing, (batch, n_experts, 1)) * xp.reshape(
        cotangent, (batch, 1, out_features))
    grad_outputs = xp.reshape(grad_outputs, (batch, n_experts * out_features))
    grads = {
        "x": xp.sum(per_expert * back, axis=0),
        "experts": xp.reshape(xp.matrix_transpose(grad_outputs) @ x, experts.shape),
        "routing": xp.matrix_transpose(xp.sum(back * x, axis=-1)),
    }
    return _with_bias_grads(grads, cotangent, routing, bias, xp=xp)


def _cond_linear_mixed(x: Any, experts: Any, routing: Any, bias: Any, *,
                       xp: ModuleType) -> Any:
    """Mixed-weight form: M_b = Σ_e α_be W_e, then y_b = M_b x_b."""
    batch, in_features = x.shape
    weights = mix(routing, experts, xp=xp)
    y = xp.reshape(weights @ xp.reshape(x, (batch, in_features, 1)), (batch, experts.shape[1]))
    return _add_mixed_bias(y, routing, bias)


def _cond_linear_mixed_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any, *,
                           xp: ModuleType) -> dict[str, Any]:
    batch, in_features = x.shape
    weights = mix(routing, experts, xp=xp)
    column = xp.reshape(cotangent, (batch, experts.shape[1], 1))
    grad_weights = column * xp.reshape(x, (batch, 1, in_features))  # M̄_b = ȳ_b x_bᵀ
    grads = mix_vjp(grad_weights, routing, experts, xp=xp)
    grads["x"] = xp.reshape(xp.matrix_transpose(weights) @ column, (batch, in_features))
    return _with_bias_grads(grads, cotangent, routing, bias, xp=xp)


def _cond_linear(x: Any, experts: Any, routing: Any, bias: Any, *, xp: ModuleType) -> Any:
    form = _cond_linear_shared if _uses_shared_matmuls(experts) else _cond_linear_mixed
    return form(x, experts, routing, bias, xp=xp)


def _cond_linear_vjp(cotangent: Any, x: Any, experts: Any, routing: Any, bias: Any, *,
                     xp: ModuleType) -> dict[str, Any]:
    form = _cond_linear_shared_vjp if _uses_shared_matmuls(experts) else _cond_linear_mixed_vjp
    return form(cotangent, x, experts, routing, bias, xp=xp)


def _cond_linear_jvp(tangents: dict[str, Any], x: Any, experts: Any, routing: Any, bias: Any,
                     *, xp: ModuleType) -> Any:
    """The tangent of :func:`_cond_linear`, one term per argument (derived in
    :func:`condconv_ref.cond_linear_jvp`), each computed in the forward's cheaper form."""
    terms = []
    if "x" in tangents:
        terms.append(_cond_linear(tangents["x"], experts, routing, None, xp=xp))
    if "experts" in tangents:
        terms.append(_cond_linear(x, tangents["experts"], routing, None, xp=xp))
    if "bias" in tangents:
        terms.append(routing @ tangents["bias"])
    if "routing" in tangents:
        terms.append(_cond_linear(x, experts, tangents["routing"], bias, xp=xp))
    return total(terms, (x.shape[0], experts.shape[1]), x, xp=xp)


# ---------------------------------------------------------------- cond_linear


@public_op
def cond_linear(x: Any, experts: Any, routing: Any, bias: Any = None) -> Any:
    r"""Conditionally parameterized fully-connected layer, routing given from outside.

    .. math::

        y_b = \Big(\sum_e \alpha_{be} W_e\Big) x_b + \sum_e \alpha_{be}\,\beta_e

    This is CondConv's "same approach extended to fully-connected layers"
    (Yang et al., 2019).  It is computed by shared matmuls when E <= F_in and
    by per-example mixed weights otherwise; both are exact (see the module
    docstring for the cost argument).

    Parameters
    ----------
    x : array, shape (B, F_in)
    experts : array, shape (E, F_out, F_in)
        :math:`W_e`, laid out like ``torch.nn.Linear.weight`` per expert.
    routing : array, shape (B, E)
        :math:`\alpha`; any real values.
    bias : array, shape (E, F_out), optional
        :math:`\beta_e`, mixed by the routing like the weights.

    Returns
    -------
    array, shape (B, F_out)

    Notes
    -----
    With :math:`z_{be} = W_e x_b`, :math:`y_b = \sum_e \alpha_{be}(z_{be} + \beta_e)`
    is bilinear in :math:`\alpha` and :math:`(W, \beta, x)`, so

    .. math::

        \bar x_b = \sum_e \alpha_{be} W_e^\top \bar y_b = M_b^\top \bar y_b,\quad
        \bar W_e = \sum_b \alpha_{be}\,\bar y_b x_b^\top,\quad
        \bar\beta_e = \sum_b \alpha_{be}\,\bar y_b,\quad
        \bar\alpha_{be} = \bar y_b^\top (W_e x_b + \beta_e).

    The shared-matmul VJP evaluates these directly, with two large matmuls and
    no recomputation of the forward: :math:`u_{eb} = W_e^\top \bar y_b` for
    every expert (one batched matmul) gives :math:`\bar x_b = \sum_e \alpha_{be} u_{eb}`
    and :math:`\bar y_b^\top W_e x_b = \langle u_{eb}, x_b\rangle`; with
    :math:`\bar z_{be} = \alpha_{be}\bar y_b` stacked to (B, E·F_out),
    :math:`\bar W_{\text{stacked}} = \bar Z^\top x`.  The
    mixed-weight VJP goes through :math:`M`: :math:`\bar x_b = M_b^\top \bar y_b`
    and :math:`\bar M_b = \bar y_b x_b^\top`, which :func:`mix_experts_vjp`
    turns into :math:`\bar W_e = \sum_b \alpha_{be}\bar M_b` and
    :math:`\bar\alpha_{be} = \langle \bar M_b, W_e\rangle = \bar y_b^\top W_e x_b`,
    the same quantities.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import cond_linear
    >>> experts = np.stack([np.eye(2), 2 * np.eye(2)])
    >>> cond_linear(np.array([[1.0, 2.0]]), experts, np.array([[1.0, 0.5]]),
    ...             bias=np.array([[0.0, 1.0], [2.0, 2.0]]))
    array([[3., 6.]])
    """
    xp = namespace("cond_linear", x=x, experts=experts, routing=routing, bias=bias)
    _check_cond_linear("cond_linear", x, experts, routing, bias, xp=xp)
    return _cond_linear(x, experts, routing, bias, xp=xp)


@public_op
def cond_linear_vjp(cotangent: Any, x: Any, experts: Any, routing: Any,
                    bias: Any = None) -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`cond_linear`.

    Returns
    -------
    dict
        ``{"x", "experts", "routing"}`` plus ``"bias"`` when ``bias`` is given.
        The derivation (for both computation forms) is in :func:`cond_linear`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import cond_linear_vjp
    >>> experts = np.stack([np.eye(2), 2 * np.eye(2)])
    >>> grads = cond_linear_vjp(np.ones((1, 2)), np.array([[1.0, 2.0]]), experts,
    ...                         np.array([[1.0, 0.5]]))
    >>> grads["x"], grads["routing"]
    (array([[2., 2.]]), array([[3., 6.]]))
    """
    xp = namespace("cond_linear_vjp", x=x, experts=experts, routing=routing, bias=bias, cotangent=cotangent)
    _check_cond_linear("cond_linear_vjp", x, experts, routing, bias, cotangent, xp=xp)
    return _cond_linear_vjp(cotangent, x, experts, routing, bias, xp=xp)


@public_op
def cond_linear_jvp(tangents: Mapping[str, Any], x: Any, experts: Any, routing: Any,
                    bias: Any = None) -> Any:
    r"""Jacobian-vector product of :func:`cond_linear`: the output's derivative along ``tangents``.

    Parameters
    ----------
    tangents : mapping
        Any of ``"x"``, ``"experts"``, ``"routing"`` and (when ``bias`` is
        given) ``"bias"``, the keys of :func:`cond_linear_vjp`, each with the
        shape of its argument; a missing key is a zero tangent.
    x, experts, routing, bias
        Exactly the arguments given to :func:`cond_linear`.

    Returns
    -------
    array, shape (B, F_out)

    Notes
    -----
    :math:`y_b = \sum_e \alpha_{be}(W_e x_b + \beta_e)` is linear in
    :math:`x`, in :math:`(W, \beta)` and in :math:`\alpha`, so

    .. math::

        \dot y_b = \sum_e \alpha_{be} W_e \dot x_b + \alpha_{be}\dot W_e x_b
                  + \alpha_{be}\dot\beta_e + \dot\alpha_{be}(W_e x_b + \beta_e),

    i.e. :func:`cond_linear` with one argument replaced by its tangent, each
    term computed in the cheaper of the forward's two forms.  Transposing each
    term gives the four gradients of :func:`cond_linear_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import cond_linear_jvp
    >>> experts = np.stack([np.eye(2), 2 * np.eye(2)])
    >>> cond_linear_jvp({"routing": np.array([[0.0, 1.0]])}, np.array([[1.0, 2.0]]), experts,
    ...                 np.array([[1.0, 0.5]]))
    array([[2., 4.]])
    """
    fn = "cond_linear_jvp"
    arrays = {"x": x, "experts": experts, "routing": routing, "bias": bias}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    _check_cond_linear(fn, x, experts, routing, bias, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return _cond_linear_jvp(tangents, x, experts, routing, bias, xp=xp)


# ---------------------------------------------------------------- mixture of experts


def _moe_expert_output(x: Any, experts: Any, bias: Any, e: int, *, xp: ModuleType) -> Any:
    """W_e x_b + β_e for every example, (B, F_out)."""
    return affine(x, experts[e, ...], None if bias is None else bias[e, ...], xp=xp)


@public_op
def moe_cond_linear(x: Any, experts: Any, routing: Any, bias: Any = None) -> Any:
    r"""The mixture-of-experts form that :func:`cond_linear` equals.

    .. math::

        y_b = \sum_e \alpha_{be}\,(W_e x_b + \beta_e)

    Same arguments and result as :func:`cond_linear`, computed one expert at
    a time with the bias added before the weighting; it exists to test the
    equivalence.

    Notes
    -----
    With :math:`y^{(e)} = x W_e^\top + \beta_e`:
    :math:`\bar\alpha_{be} = \langle \bar y_b, y^{(e)}_b\rangle`, and with
    :math:`\bar y^{(e)} = \alpha_{:,e} \odot \bar y` (each row scaled),
    :math:`\bar x = \sum_e \bar y^{(e)} W_e`,
    :math:`\bar W_e = \bar y^{(e)\top} x` and
    :math:`\bar\beta_e = \sum_b \bar y^{(e)}_b`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import cond_linear, moe_cond_linear
    >>> rng = np.random.default_rng(0)
    >>> x, experts = rng.normal(size=(4, 3)), rng.normal(size=(5, 2, 3))
    >>> routing, bias = rng.uniform(size=(4, 5)), rng.normal(size=(5, 2))
    >>> bool(np.allclose(moe_cond_linear(x, experts, routing, bias),
    ...                  cond_linear(x, experts, routing, bias)))
    True
    """
    xp = namespace("moe_cond_linear", x=x, experts=experts, routing=routing, bias=bias)
    _check_cond_linear("moe_cond_linear", x, experts, routing, bias, xp=xp)
    y = routing[:, 0:1] * _moe_expert_output(x, experts, bias, 0, xp=xp)
    for e in range(1, experts.shape[0]):
        y = y + routing[:, e:e + 1] * _moe_expert_output(x, experts, bias, e, xp=xp)
    return y


@public_op
def moe_cond_linear_vjp(cotangent: Any, x: Any, experts: Any, routing: Any,
                        bias: Any = None) -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`moe_cond_linear` (derivation there).

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import moe_cond_linear_vjp
    >>> experts = np.stack([np.eye(2), 2 * np.eye(2)])
    >>> moe_cond_linear_vjp(np.ones((1, 2)), np.array([[1.0, 2.0]]), experts,
    ...                     np.array([[1.0, 0.5]]))["routing"]
    array([[3., 6.]])
    """
    xp = namespace("moe_cond_linear_vjp", x=x, experts=experts, routing=routing, bias=bias, cotangent=cotangent)
    _check_cond_linear("moe_cond_linear_vjp", x, experts, routing, bias, cotangent, xp=xp)
    grad_x = xp.zeros_like(x)
    expert_grads, bias_grads, routing_grads = [], [], []
    for e in range(experts.shape[0]):
        output = _moe_expert_output(x, experts, bias, e, xp=xp)
        routing_grads.append(xp.sum(cotangent * output, axis=1))
        grad_output = routing[:, e:e + 1] * cotangent
        grad_input, grad_expert = affine_vjp(grad_output, x, experts[e, ...], xp=xp)
        grad_x = grad_x + grad_input
        expert_grads.append(grad_expert)
        bias_grads.append(xp.sum(grad_output, axis=0))
    grads = {"x": grad_x, "experts": xp.stack(expert_grads),
             "routing": xp.stack(routing_grads, axis=1)}
    if bias is not None:
        grads["bias"] = xp.stack(bias_grads)
    return grads


@public_op
def moe_cond_linear_jvp(tangents: Mapping[str, Any], x: Any, experts: Any, routing: Any,
                        bias: Any = None) -> Any:
    r"""Jacobian-vector product of :func:`moe_cond_linear`; arguments as :func:`cond_linear_jvp`.

    Notes
    -----
    With :math:`y^{(e)} = x W_e^\top + \beta_e`, the product rule on
    :math:`y = \sum_e \alpha_{:,e} \odot y^{(e)}` gives
    :math:`\dot y = \sum_e \dot\alpha_{:,e}\odot y^{(e)} + \alpha_{:,e}\odot
    (\dot x W_e^\top + x \dot W_e^\top + \dot\beta_e)`, one expert at a time.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import moe_cond_linear_jvp
    >>> experts = np.stack([np.eye(2), 2 * np.eye(2)])
    >>> moe_cond_linear_jvp({"x": np.array([[1.0, 0.0]])}, np.array([[1.0, 2.0]]), experts,
    ...                     np.array([[1.0, 0.5]]))
    array([[2., 0.]])
    """
    fn = "moe_cond_linear_jvp"
    arrays = {"x": x, "experts": experts, "routing": routing, "bias": bias}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    _check_cond_linear(fn, x, experts, routing, bias, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    terms = []
    for e in range(experts.shape[0]):
        expert_tangent = affine_jvp(
            tangents.get("x"), None if "experts" not in tangents else tangents["experts"][e, ...],
            None if "bias" not in tangents else tangents["bias"][e, ...], x, experts[e, ...],
            xp=xp)
        if expert_tangent is not None:
            terms.append(routing[:, e:e + 1] * expert_tangent)
        if "routing" in tangents:
            terms.append(tangents["routing"][:, e:e + 1]
                         * _moe_expert_output(x, experts, bias, e, xp=xp))
    return total(terms, (x.shape[0], experts.shape[1]), x, xp=xp)


# ---------------------------------------------------------------- the layer


def _check_layer(fn: str, x: Any, p: dict[str, Any], cotangent: Any = None, *,
                 xp: ModuleType) -> None:
    """Validate a :func:`cond_linear_layer` (``cotangent``: its VJP) call."""
    _check_operands(fn, x, p["experts"], p["bias"])
    n_experts, in_features = p["experts"].shape[0], x.shape[1]
    check_ndim(fn, "route_weight", p["route_weight"], 2, "(E, F_in)")
    check_shape(fn, "route_weight", p["route_weight"], (n_experts, in_features),
                f"(E, F_in) with E={n_experts} from experts and F_in={in_features} from x")
    if p["route_bias"] is not None:
        check_shape(fn, "route_bias", p["route_bias"], (n_experts,), "(E,)")
    _check_cotangent(fn, cotangent, x, p["experts"])
    check_nonempty(fn, x=x, **p)
    check_memory(fn, itemsize(x, xp=xp),
                 _working_memory(x, p["experts"], vjp=cotangent is not None))


@public_op
def cond_linear_layer(x: Any, params: Mapping[str, Any]) -> Any:
    r"""The whole linear CondConv layer: sigmoid routing from ``x``, then :func:`cond_linear`.

    .. math::

        \alpha = \sigma(x R^\top + r),\qquad
        y = \mathrm{cond\_linear}(x, W, \alpha, \beta)

    There is nothing to pool: the routing reads the features directly
    (:func:`route_sigmoid` on a 2-D input).

    Parameters
    ----------
    x : array, shape (B, F_in)
    params : mapping
        ``experts`` (E, F_out, F_in); ``route_weight`` :math:`R` (E, F_in);
        optional ``bias`` (E, F_out) and ``route_bias`` :math:`r` (E,).

    Returns
    -------
    array, shape (B, F_out)

    Notes
    -----
    ``x`` reaches the output along two paths, the product and the routing, so
    :math:`\bar x = \mathrm{cond\_linear\_vjp}_x + \mathrm{route\_sigmoid\_vjp}_x(\bar\alpha)`
    with :math:`\bar\alpha` from :func:`cond_linear_vjp`; with
    :math:`\bar z = \bar\alpha \odot \sigma'(z)` that second term is
    :math:`\bar z R`, and :math:`\bar R = \bar z^\top x`,
    :math:`\bar r = \sum_b \bar z_b`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import cond_linear_layer
    >>> params = {"experts": np.stack([np.eye(2), 3 * np.eye(2)]),
    ...           "route_weight": np.zeros((2, 2))}
    >>> cond_linear_layer(np.array([[1.0, -1.0]]), params)
    array([[ 2., -2.]])
    """
    fn = "cond_linear_layer"
    p = layer_params(fn, params)
    xp = namespace(fn, x=x, **p)
    _check_layer(fn, x, p, xp=xp)
    return layer(x, p, SIGMOID, _cond_linear, xp=xp)


@public_op
def cond_linear_layer_vjp(cotangent: Any, x: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    r"""Vector-Jacobian product of :func:`cond_linear_layer` (derivation there).

    Returns
    -------
    dict
        ``"x"`` (through both the product and the routing) and one entry per
        key present in ``params``.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import cond_linear_layer_vjp
    >>> params = {"experts": np.stack([np.eye(2), 3 * np.eye(2)]),
    ...           "route_weight": np.zeros((2, 2))}
    >>> grads = cond_linear_layer_vjp(np.ones((1, 2)), np.array([[1.0, -1.0]]), params)
    >>> sorted(grads), grads["x"]
    (['experts', 'route_weight', 'x'], array([[2., 2.]]))
    """
    fn = "cond_linear_layer_vjp"
    p = layer_params(fn, params)
    xp = namespace(fn, x=x, cotangent=cotangent, **p)
    _check_layer(fn, x, p, cotangent, xp=xp)
    return layer_vjp(cotangent, x, p, SIGMOID, _cond_linear_vjp, xp=xp)


@public_op
def cond_linear_layer_jvp(tangents: Mapping[str, Any], x: Any, params: Mapping[str, Any]) -> Any:
    r"""Jacobian-vector product of :func:`cond_linear_layer`.

    ``tangents`` maps any of ``"x"`` and the keys present in ``params`` (the
    keys of :func:`cond_linear_layer_vjp`) to tangents of their arguments'
    shapes; a missing key is a zero tangent.  Returns (B, F_out).

    Notes
    -----
    The routing's tangent :math:`\dot\alpha = \sigma'(z)\odot(\dot x R^\top +
    x\dot R^\top + \dot r)` (:func:`route_sigmoid_jvp` on a 2-D input), then
    :func:`cond_linear_jvp` along :math:`(\dot x, \dot W, \dot\alpha, \dot\beta)`.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import cond_linear_layer_jvp
    >>> params = {"experts": np.stack([np.eye(2), 3 * np.eye(2)]),
    ...           "route_weight": np.zeros((2, 2))}
    >>> cond_linear_layer_jvp({"x": np.array([[1.0, 0.0]])}, np.array([[1.0, -1.0]]), params)
    array([[2., 0.]])
    """
    fn = "cond_linear_layer_jvp"
    p = layer_params(fn, params)
    arrays = {"x": x, **p}
    tangents, xp = tangent_namespace(fn, tangents, arrays)
    _check_layer(fn, x, p, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return layer_jvp(tangents, x, p, SIGMOID, _cond_linear_jvp, xp=xp)


@public_op
def cond_linear_layer_hvp(cotangent: Any, tangents: Mapping[str, Any], x: Any,
                          params: Mapping[str, Any]) -> dict[str, Any]:
    r"""Hessian-vector product of :func:`cond_linear_layer`: the derivative of
    :func:`cond_linear_layer_vjp` at a fixed ``cotangent`` (B, F_out) along ``tangents``.

    ``tangents`` is keyed as for :func:`cond_linear_layer_jvp`.  Returns a dict
    keyed like the VJP's gradients.  Derived as in :func:`condconv_layer_hvp`:
    :func:`cond_linear` is linear in each argument and the sigmoid router adds
    its own term.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import cond_linear_layer_hvp
    >>> params = {"experts": np.ones((2, 2, 2)), "route_weight": np.zeros((2, 2))}
    >>> hvp = cond_linear_layer_hvp(np.ones((1, 2)), {"experts": np.ones((2, 2, 2))},
    ...                             np.array([[1.0, -1.0]]), params)
    >>> hvp["x"]
    array([[2., 2.]])
    """
    fn = "cond_linear_layer_hvp"
    p = layer_params(fn, params)
    arrays = {"x": x, **p}
    tangents, xp = tangent_namespace(fn, tangents, arrays, cotangent)
    _check_layer(fn, x, p, cotangent, xp=xp)
    check_tangent_shapes(fn, tangents, arrays)
    return layer_hvp(cotangent, tangents, x, p, SIGMOID, _cond_linear_vjp, xp=xp)
