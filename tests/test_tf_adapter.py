"""``keras_implementation``: Keras layers (TensorFlow) checked like PyTorch modules, in both data
formats, with the weights mapped by name and the gradients returned in the reference's layouts.

Skipped without TensorFlow (the ``tensorflow`` extra)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from condconv_ref import layouts  # noqa: E402
from condconv_ref.cli import main  # noqa: E402
from condconv_ref.testing import check_implementation  # noqa: E402
from condconv_ref.testing.tf_adapter import keras_implementation  # noqa: E402

pytestmark = pytest.mark.tensorflow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import condconv_keras as example  # noqa: E402

sys.path.remove(str(EXAMPLES))

FORMATS = ("channels_last", "channels_first")


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("factory, variant", [(example.condconv_factory, "condconv"),
                                              (example.depthwise_factory, "depthwise_condconv")])
def test_the_keras_examples_pass_forward_and_vjp(factory, variant, data_format):
    report = check_implementation(factory(data_format), variant=variant, max_examples=12)
    assert report.passed and report.checked_vjp
    assert report.turned_away > 0  # TensorFlow's limits are declared, not hit


def test_the_check_command_runs_the_keras_example(capsys):
    assert main(["check", f"{EXAMPLES / 'condconv_keras.py'}:depthwise_factory", "--variant",
                 "depthwise_condconv", "--examples", "6", "--dtype", "float32"]) == 0
    assert "PASSED after 6 examples" in capsys.readouterr().out


class _MixedWithoutBias(example.CondConv2D):
    """A layer that forgets the bias when it has two experts or more."""

    def call(self, inputs, routing_weights):
        outputs = super().call(inputs, routing_weights)
        if self.use_bias and self.num_experts > 1:
            bias = tf.matmul(routing_weights, self.condconv_bias)
            outputs -= bias[:, None, None, :] if self.data_format == "channels_last" \
                else bias[:, :, None, None]
        return outputs


@pytest.mark.parametrize("data_format", FORMATS)
def test_a_broken_keras_layer_fails_on_a_minimal_case(data_format, monkeypatch):
    monkeypatch.setattr(example, "CondConv2D", _MixedWithoutBias)
    report = check_implementation(example.condconv_factory(data_format), variant="condconv",
                                  max_examples=40, raise_on_failure=False)
    assert not report.passed
    assert report.case.shapes["experts"][0] == 2 and "bias" in report.case.arrays
    # the output, or (where the shrunk bias cancels, e.g. [1, -1]) the routing gradient
    assert report.mismatches[0].what in ("output", "gradient 'routing'")


def test_a_layout_mismatch_is_caught():
    weights = {**example.CONDCONV_WEIGHTS,
               "experts": ("condconv_kernel",
                           lambda experts, case: layouts.to_torch_flat_experts(experts))}
    implementation = keras_implementation(example.build_condconv("channels_last"), weights,
                                          inputs=("x", "routing"), supports=example.SUPPORTS)
    report = check_implementation(implementation, variant="condconv", max_examples=40,
                                  raise_on_failure=False)
    assert not report.passed


def _always_biased(case):
    layer = example.build_condconv("channels_last")(case)
    layer.use_bias = True
    return layer


@pytest.mark.parametrize("weights, why", [
    ({"experts": example.CONDCONV_WEIGHTS["experts"]}, "no case array is mapped to it"),
    (example.CONDCONV_WEIGHTS, "it is mapped from 'bias', which this case does not have"),
])
def test_a_weight_left_with_its_initial_values_is_a_failure_naming_it(weights, why):
    implementation = keras_implementation(_always_biased, weights, inputs=("x", "routing"),
                                          supports=example.SUPPORTS)
    report = check_implementation(implementation, variant="condconv", max_examples=5,
                                  supports=replace(example.SUPPORTS, bias=(False,)),
                                  raise_on_failure=False)
    assert not report.passed
    assert "layer weight 'condconv_bias' is not mapped from the case" in report.mismatches[0].reason
    assert why in report.mismatches[0].reason


def test_an_unmapped_case_array_is_a_failure_naming_it():
    implementation = keras_implementation(example.build_condconv("channels_last"),
                                          {"experts": example.CONDCONV_WEIGHTS["experts"]},
                                          inputs=("x", "routing"))
    report = check_implementation(implementation, variant="condconv", max_examples=5,
                                  supports=replace(example.SUPPORTS, bias=(True,)),
                                  raise_on_failure=False)
    assert "case arrays ['bias'] are neither mapped" in report.mismatches[0].reason


def test_a_converter_that_does_more_than_rearrange_is_refused():
    weights = {**example.CONDCONV_WEIGHTS,
               "experts": ("condconv_kernel",
                           lambda experts, case: 2 * layouts.to_tf_flat_experts(experts))}
    implementation = keras_implementation(example.build_condconv("channels_last"), weights,
                                          inputs=("x", "routing"), supports=example.SUPPORTS)
    report = check_implementation(implementation, variant="condconv", max_examples=5,
                                  raise_on_failure=False)
    assert "the converter of 'experts' must rearrange" in report.mismatches[0].reason


def test_a_bad_data_format_is_refused():
    with pytest.raises(ValueError, match="keras_implementation: data_format must be one of"):
        keras_implementation(example.build_condconv("channels_last"), {},
                             data_format="NHWC")
