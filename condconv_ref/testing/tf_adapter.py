"""Turn a Keras layer (TensorFlow) into the ``forward`` / ``vjp`` callables the checker calls.

:func:`keras_implementation` builds the layer for each case, calls it once so
that Keras creates its weights, assigns the case's arrays to the weights by
name (through a layout converter where the layer stores them differently),
and gets the VJP from :class:`tf.GradientTape`.  Inputs and outputs are moved
between the reference's channels-first layout and the layer's
``data_format``.  TensorFlow is imported only when a callable runs; install it
with the ``tensorflow`` extra (``pip install condconv_ref[tensorflow]``).

A converter turns a reference array (NumPy) into the weight's storage, e.g.
:func:`condconv_ref.layouts.to_tf_flat_experts` for ``CondConv2D``'s
flattened HWIO kernel.  It must only rearrange the elements (reshapes and
transposes, as every converter of :mod:`condconv_ref.layouts` does): the
weight's gradient is rearranged back the same way, so gradients come back in
the reference's layout.

Examples
--------
A 1-D CondConv written in TensorFlow, channels last, with its experts in
TensorFlow's flattened storage:

>>> import tensorflow as tf
>>> import keras
>>> from condconv_ref import layouts
>>> from condconv_ref.testing import Supports, check_implementation
>>> from condconv_ref.testing.tf_adapter import keras_implementation
>>> class CondConv1D(keras.layers.Layer):
...     def __init__(self, filters, kernel_size, experts, **kwargs):
...         super().__init__(**kwargs)
...         self.filters, self.kernel_size, self.experts = filters, kernel_size, experts
...     def build(self, input_shape):
...         size = self.kernel_size * input_shape[-1] * self.filters
...         self.kernel = self.add_weight(name="kernel", shape=(self.experts, size))
...         self.routing = keras.layers.Dense(self.experts, use_bias=False, name="routing",
...                                            dtype=self.dtype)
...     def call(self, x):
...         alpha = tf.sigmoid(self.routing(tf.reduce_mean(x, axis=1)))
...         kernels = tf.reshape(alpha @ self.kernel,
...                              (-1, self.kernel_size, x.shape[-1], self.filters))
...         return tf.concat([tf.nn.conv1d(x[b:b + 1], kernels[b], 1, "VALID")
...                           for b in range(x.shape[0])], axis=0)
>>> def build(case):
...     E, O, C, k = case.arrays["experts"].shape
...     return CondConv1D(O, k, E, dtype=case.dtype)
>>> layer = keras_implementation(
...     build, {"experts": ("kernel", lambda e, case: layouts.to_tf_flat_experts(e)),
...             "route_weight": ("routing/kernel", lambda w, case: w.T)},
...     supports=Supports(spatial_dims=(1,), padding_forms=("valid",),
...                       padding_modes=("zeros",), max_groups=1, max_stride=1,
...                       max_dilation=1, bias=(False,)))
>>> check_implementation(layer, variant="condconv_layer", max_examples=10).passed
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from condconv_ref import layouts
from condconv_ref._cases import Supports
from condconv_ref.testing.checker import (
    Implementation,
    check_every_array_mapped,
    parameter_mapping,
)
from condconv_ref.variants import Case

__all__ = ["DATA_FORMATS", "keras_implementation"]

Converter = Callable[[np.ndarray, Case], Any]

DATA_FORMATS = ("channels_last", "channels_first")
"""Keras's two data formats: (B, \\*spatial, C), TensorFlow's default, and (B, C, \\*spatial)."""


def _weight_name(weight: Any, layer: Any) -> str:
    """A weight's name relative to ``layer``: its path without the layer's own name and
    without TensorFlow's ``:0`` suffix (``"routing/kernel"``, ``"kernel"``)."""
    path = str(getattr(weight, "path", None) or weight.name).removesuffix(":0")
    return path.removeprefix(f"{layer.name}/")


def _converted(name: str, values: np.ndarray, converter: Converter | None, case: Case,
               shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """The array in the weight's storage, and where each of its elements came from (None
    without a converter): the converter applied to the elements' flat indices."""
    if converter is None:
        return values, None
    stored = np.asarray(converter(values, case))
    numbers = np.arange(1, values.size + 1, dtype=np.float64)  # from 1: a scale shows
    where = np.asarray(converter(numbers.reshape(values.shape), case))
    if stored.shape != tuple(shape) or where.shape != stored.shape or not np.array_equal(
            np.sort(where, axis=None), numbers):
        raise ValueError(f"keras_implementation: the converter of {name!r} must rearrange its "
                         f"{values.shape} array into the weight's shape {tuple(shape)} "
                         f"(reshapes and transposes only), got shape {stored.shape}")
    return stored, where.astype(np.int64) - 1


def _unconverted(gradient: np.ndarray, where: np.ndarray | None,
                 shape: tuple[int, ...]) -> np.ndarray:
    """A weight's gradient back in the reference's layout: each element returned to where
    the converter took it from."""
    if where is None:
        return gradient
    back = np.empty(int(np.prod(shape)), dtype=gradient.dtype)
    back[where.ravel()] = gradient.ravel()
    return back.reshape(shape)


def keras_implementation(
    build: Callable[[Case], Any],
    parameters: Mapping[str, str | tuple[str, Converter]],
    *,
    inputs: Sequence[str] = ("x",),
    data_format: str = "channels_last",
    supports: Supports | None = None,
) -> Implementation:
    """An :class:`~condconv_ref.testing.Implementation` of a Keras layer (TensorFlow backend).

    Parameters
    ----------
    build : callable
        ``build(case) -> layer``: the layer configured for the case's sizes
        and options (``case.arrays[...].shape``, ``case.options``), with
        ``dtype=case.dtype``.  Its weight values do not matter; the case's
        replace them.  Raise :class:`~condconv_ref.testing.Unsupported` for a
        case the layer cannot take.
    parameters : mapping
        Reference array name -> the layer's weight, named relative to the layer
        (``"kernel"``, ``"routing/kernel"`` for a weight of a sublayer named
        ``routing``: name the sublayers, Keras numbers unnamed ones), or a pair
        ``(name, converter)`` with ``converter(array, case)`` turning the
        reference's NumPy array into the weight's storage, e.g.
        ``lambda e, case: layouts.to_tf_flat_experts(e)``.  A converter must only
        rearrange the elements.  Every array of a case must be mapped here or
        named in ``inputs``, and every trainable weight of the layer must get
        its value from an array of the case; either gap is reported as a
        failure, naming the array or weight.
    inputs : sequence of str
        Case arrays passed positionally to the layer: ``("x",)``, or ``("x",
        "routing")`` for the external-routing variants (``condconv``,
        ``depthwise_condconv``), as TensorFlow's ``CondConv2D`` takes them.
    data_format : {'channels_last', 'channels_first'}
        The layer's layout of ``x`` and of its output: ``x`` is handed over,
        and the output and the gradient of ``x`` are read back, in it.
    supports : Supports, optional
        Carried into the :class:`Implementation` for the checker.

    Returns
    -------
    Implementation
        ``forward(case)`` returns the layer's output, ``vjp(case, cotangent)``
        the gradient of every case array, in the reference's layouts (zeros for
        an array the output does not depend on).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"keras_implementation: data_format must be one of {DATA_FORMATS}, "
                         f"got {data_format!r}")
    mapping = parameter_mapping("keras_implementation", parameters, "a weight name")
    inputs = tuple(inputs)
    channels_last = data_format == "channels_last"

    def layer_layout(name: str, values: np.ndarray) -> np.ndarray:
        return layouts.to_channels_last(values) if channels_last and name == "x" else values

    def run(case: Case, cotangent: np.ndarray | None) -> tuple[Any, dict[str, Any]]:
        import tensorflow as tf

        check_every_array_mapped("keras_implementation", case, mapping, inputs, "layer weights")
        dtype = tf.as_dtype(case.dtype)  # bfloat16 arrives as float32 holding its values
        given = [tf.constant(layer_layout(name, case.arrays[name]), dtype=dtype)
                 for name in inputs]
        layer = build(case)
        if not layer.built:
            layer(*given)  # Keras creates the weights on the first call
        weights = {_weight_name(w, layer): w for w in layer.weights}
        origins = {}
        for name, (target, converter) in mapping.items():
            if name not in case.arrays:
                continue
            if target not in weights:
                raise ValueError(f"keras_implementation: layer has no weight {target!r} (for "
                                 f"{name!r}); it has {sorted(weights)}")
            weight = weights[target]
            stored, origins[name] = _converted(name, case.arrays[name], converter, case,
                                               tuple(weight.shape))
            weight.assign(tf.cast(stored, weight.dtype))
        _check_every_weight_set(layer, weights, mapping, case)
        if cotangent is None:
            return layer(*given), {}
        with tf.GradientTape() as tape:
            tape.watch(given)
            output = layer(*given)
        targets = [given[inputs.index(name)] if name in inputs else weights[mapping[name][0]]
                   for name in case.differentiable]
        grads = tape.gradient(output, targets, output_gradients=tf.constant(
            layer_layout("x", cotangent), dtype=output.dtype))
        result = {}
        for name, grad in zip(case.differentiable, grads):
            shape = case.arrays[name].shape
            if grad is None:
                result[name] = np.zeros(shape, dtype=np.float64)
                continue
            grad = np.asarray(tf.cast(grad, tf.float64))
            if name in inputs:
                result[name] = layouts.to_channels_first(grad) if channels_last and \
                    name == "x" else grad
            else:
                result[name] = _unconverted(grad, origins[name], shape)
        return output, result

    def read(output: Any) -> np.ndarray:
        import tensorflow as tf

        values = np.asarray(tf.cast(output, tf.float64) if output.dtype == tf.bfloat16
                            else output)
        return layouts.to_channels_first(values) if channels_last else values

    def forward(case: Case) -> Any:
        return read(run(case, None)[0])

    def vjp(case: Case, cotangent: Any) -> dict[str, Any]:
        return run(case, np.asarray(cotangent))[1]

    return Implementation(forward, vjp, supports)


def _check_every_weight_set(layer: Any, weights: Mapping[str, Any],
                            mapping: Mapping[str, tuple[str, Converter | None]],
                            case: Case) -> None:
    """Raise when a trainable weight of ``layer`` gets no value from ``case``: it would run
    with its random initial values."""
    sources = {target: name for name, (target, _) in mapping.items()}
    for target, weight in weights.items():
        if not weight.trainable or (target in sources and sources[target] in case.arrays):
            continue
        if target in sources:
            reason = (f"it is mapped from {sources[target]!r}, which this case does not have "
                      f"(case arrays: {sorted(case.arrays)}); build the layer without it for "
                      f"such cases, or narrow supports (Supports.optional)")
        else:
            reason = (f"no case array is mapped to it (mapped: {sorted(sources)}); add it to "
                      f"parameters, or build the layer without it")
        raise ValueError(f"keras_implementation: layer weight {target!r} is not mapped from "
                         f"the case: {reason}; it would run with its initial values")
