"""Check Keras CondConv2D and DepthwiseCondConv2D layers, as EfficientNet-CondConv writes them.

Both layers take the routing weights from the block (``call(inputs,
routing_weights)``) and store their experts flattened, one row per expert:

* :class:`CondConv2D` -- ``condconv_kernel`` (E, kh*kw*C*O), flattened HWIO,
  and ``condconv_bias`` (E, O); checked as the ``condconv`` variant.
* :class:`DepthwiseCondConv2D` -- ``depthwise_condconv_kernel`` (E, kh*kw*C*m)
  and ``depthwise_condconv_bias`` (E, C*m); checked as ``depthwise_condconv``.

Each example runs its own convolution (the per-example loop of the original
layers), channels last or channels first.  TensorFlow's convolutions take a
stride above 1 or a dilation above 1 but not both, and its depthwise
convolution only equal strides on both axes: ``Supports.excludes`` says so.

Run ``python examples/condconv_keras.py [--examples N]``, or
``condconv-ref check examples/condconv_keras.py:condconv_factory --variant condconv``
(``:depthwise_factory --variant depthwise_condconv``).
"""

from __future__ import annotations

import argparse
import sys

import keras
import tensorflow as tf

from condconv_ref import layouts
from condconv_ref.testing import Supports, check_implementation
from condconv_ref.testing.tf_adapter import keras_implementation


def tensorflow_limits(case):
    """Why TensorFlow's convolution cannot run ``case``, or None."""
    stride, dilation = case.options["stride"], case.options["dilation"]
    if max(stride) > 1 and max(dilation) > 1:
        return f"stride {stride} and dilation {dilation} both above 1"
    if case.variant == "depthwise_condconv" and len(set(stride)) > 1:
        return f"unequal strides {stride} in a depthwise convolution"
    return None


SUPPORTS = Supports(spatial_dims=(2,), padding_forms=("valid", "same"), padding_modes=("zeros",),
                    max_groups=1, excludes=tensorflow_limits)
"""Keras's padding ('valid' or 'same', zeros), no groups, stride or dilation."""

DEPTHWISE_SUPPORTS = Supports(spatial_dims=(2,), padding_forms=("valid", "same"),
                              padding_modes=("zeros",), excludes=tensorflow_limits)
"""As ``SUPPORTS``, with up to 3 channels (the depthwise groups) and depth multipliers."""


class CondConv2D(keras.layers.Layer):
    """CondConv with routing weights given, experts stored as flattened HWIO kernels."""

    def __init__(self, filters, kernel_size, num_experts, strides=(1, 1), padding="valid",
                 dilation_rate=(1, 1), use_bias=True, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.num_experts = filters, tuple(kernel_size), num_experts
        self.strides, self.padding = tuple(strides), padding.upper()
        self.dilation_rate, self.use_bias = tuple(dilation_rate), use_bias
        self.data_format = data_format

    def channels(self, inputs_shape):
        return inputs_shape[-1] if self.data_format == "channels_last" else inputs_shape[1]

    def build(self, inputs_shape, routing_weights_shape):
        self.kernel_shape = self.kernel_size + (self.channels(inputs_shape), self.filters)
        size = 1
        for n in self.kernel_shape:
            size *= n
        self.condconv_kernel = self.add_weight(name="condconv_kernel",
                                               shape=(self.num_experts, size))
        self.condconv_bias = self.add_weight(name="condconv_bias",
                                             shape=(self.num_experts, self.filters)) \
            if self.use_bias else None

    def convolve(self, x, kernel):
        return tf.nn.convolution(x, kernel, strides=self.strides, padding=self.padding,
                                 dilations=self.dilation_rate)

    def call(self, inputs, routing_weights):
        if self.data_format == "channels_first":  # TensorFlow's CPU convolutions are NHWC
            inputs = tf.transpose(inputs, (0, 2, 3, 1))
        kernels = tf.matmul(routing_weights, self.condconv_kernel)
        outputs = []
        for example in range(inputs.shape[0]):
            kernel = tf.reshape(kernels[example], self.kernel_shape)
            outputs.append(self.convolve(inputs[example:example + 1], kernel))
        outputs = tf.concat(outputs, axis=0)
        if self.use_bias:
            outputs += tf.matmul(routing_weights, self.condconv_bias)[:, None, None, :]
        if self.data_format == "channels_first":
            outputs = tf.transpose(outputs, (0, 3, 1, 2))
        return outputs


class DepthwiseCondConv2D(CondConv2D):
    """Depthwise CondConv: ``depth_multiplier`` filters per channel, output channel c*m + j."""

    def __init__(self, kernel_size, num_experts, depth_multiplier=1, **kwargs):
        super().__init__(0, kernel_size, num_experts, **kwargs)
        self.depth_multiplier = depth_multiplier

    def build(self, inputs_shape, routing_weights_shape):
        channels = self.channels(inputs_shape)
        self.kernel_shape = self.kernel_size + (channels, self.depth_multiplier)
        size = self.kernel_size[0] * self.kernel_size[1] * channels * self.depth_multiplier
        self.condconv_kernel = self.add_weight(name="depthwise_condconv_kernel",
                                               shape=(self.num_experts, size))
        self.condconv_bias = self.add_weight(
            name="depthwise_condconv_bias",
            shape=(self.num_experts, channels * self.depth_multiplier)) \
            if self.use_bias else None

    def convolve(self, x, kernel):
        return tf.nn.depthwise_conv2d(x, kernel, strides=(1, *self.strides, 1),
                                      padding=self.padding, dilations=self.dilation_rate)


def build_condconv(data_format):
    def build(case):
        n_experts, filters, _, *kernel = case.arrays["experts"].shape
        options = case.options
        return CondConv2D(filters, kernel, n_experts, strides=options["stride"],
                          padding=options["padding"], dilation_rate=options["dilation"],
                          use_bias="bias" in case.arrays, data_format=data_format,
                          dtype=case.dtype)

    return build


def build_depthwise(data_format):
    def build(case):
        n_experts, _, _, *kernel = case.arrays["experts"].shape
        options = case.options
        return DepthwiseCondConv2D(kernel, n_experts,
                                   depth_multiplier=options["depth_multiplier"],
                                   strides=options["stride"], padding=options["padding"],
                                   dilation_rate=options["dilation"],
                                   use_bias="bias" in case.arrays, data_format=data_format,
                                   dtype=case.dtype)

    return build


CONDCONV_WEIGHTS = {
    "experts": ("condconv_kernel", lambda experts, case: layouts.to_tf_flat_experts(experts)),
    "bias": "condconv_bias",
}
DEPTHWISE_WEIGHTS = {
    "experts": ("depthwise_condconv_kernel", lambda experts, case:
                layouts.to_tf_flat_depthwise_experts(
                    experts, depth_multiplier=case.options["depth_multiplier"])),
    "bias": "depthwise_condconv_bias",
}
"""Reference array name -> layer weight (with the layout converter for the experts); ``x``
and ``routing`` are the layer's inputs."""


def condconv_factory(data_format="channels_last"):
    """CondConv2D, for ``condconv-ref check --variant condconv``."""
    return keras_implementation(build_condconv(data_format), CONDCONV_WEIGHTS,
                                inputs=("x", "routing"), data_format=data_format,
                                supports=SUPPORTS)


def depthwise_factory(data_format="channels_last"):
    """DepthwiseCondConv2D, for ``condconv-ref check --variant depthwise_condconv``."""
    return keras_implementation(build_depthwise(data_format), DEPTHWISE_WEIGHTS,
                                inputs=("x", "routing"), data_format=data_format,
                                supports=DEPTHWISE_SUPPORTS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=50)
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    args = parser.parse_args(argv)
    passed = True
    for name, factory, variant in (("CondConv2D", condconv_factory, "condconv"),
                                   ("DepthwiseCondConv2D", depthwise_factory,
                                    "depthwise_condconv")):
        for data_format in ("channels_last", "channels_first"):
            report = check_implementation(factory(data_format), variant=variant,
                                          dtype=args.dtype, max_examples=args.examples,
                                          raise_on_failure=False)
            print(f"{name} ({data_format}): {report}")
            passed &= report.passed
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
