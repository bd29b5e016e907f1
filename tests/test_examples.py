"""The examples run, pass their own checks, and work through ``condconv-ref check``."""

from __future__ import annotations

import re
import runpy
import sys
import textwrap
from pathlib import Path

import pytest

from condconv_ref.cli import main

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    return lines[0]


FIRST_ORDER, SECOND_ORDER = "forward, VJP and JVP", "forward, VJP, JVP and HVP"
"""What the torch adapter's implementations are checked for: to second order where the variant
has a reference Hessian-vector product."""


@pytest.mark.parametrize("script, reports, checked", [
    ("condconv_torch.py", 2, SECOND_ORDER), ("depthwise_condconv_torch.py", 1, FIRST_ORDER),
    ("dynamic_conv_torch.py", 1, SECOND_ORDER), ("odconv_torch.py", 1, SECOND_ORDER)])
def test_example_script_checks_its_layers_and_exits_0(script, reports, checked, monkeypatch,
                                                      capsys):
    """Each script runs as ``python examples/<script> --examples 8`` would (in-process)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [script, "--examples", "8"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert exited.value.code == 0, out
    assert out.count(f"({checked}, float64, seed 0): PASSED after 8 examples") == reports


@pytest.mark.parametrize("target, variant, checked", [
    ("condconv_torch.py:factory", "condconv_layer", SECOND_ORDER),
    ("condconv_torch.py:loop_factory", "condconv_layer", SECOND_ORDER),
    ("depthwise_condconv_torch.py:factory", "depthwise_condconv", FIRST_ORDER),
    ("dynamic_conv_torch.py:factory", "dynamic_conv_layer", SECOND_ORDER),
    ("odconv_torch.py:factory", "odconv_layer", SECOND_ORDER),
])
def test_check_command_passes_the_examples(target, variant, checked, capsys):
    assert main(["check", str(EXAMPLES / target), "--variant", variant, "--examples", "8",
                 "--dtype", "float32", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert f"{variant} ({checked}, float32, seed 3): PASSED after 8 examples" in out
    assert ("hvp not checked" in out) == (checked == FIRST_ORDER)


BROKEN = textwrap.dedent('''
    import torch.nn.functional as F
    from condconv_torch import CondConv2d, build, PARAMETERS, SUPPORTS
    from condconv_ref.testing.torch_adapter import torch_implementation

    class SeedCondConv2d(CondConv2d):
        def convolve(self, x, weight, bias, groups):  # seed 000: padding ignored for zeros
            if self.padding_mode == "zeros":
                return F.conv2d(x, weight, bias, stride=self.stride, padding="valid",
                                dilation=self.dilation, groups=groups)
            return super().convolve(x, weight, bias, groups)

    def factory():
        return torch_implementation(build(SeedCondConv2d), PARAMETERS, supports=SUPPORTS)

    def pair():
        implementation = factory()
        return implementation.forward, implementation.vjp
''')


def test_check_command_reports_a_minimal_case_and_exits_1(tmp_path, capsys):
    path = tmp_path / "seed_layer.py"
    path.write_text(BROKEN)
    sys.path.insert(0, str(EXAMPLES))  # where the broken layer imports its parent from
    try:
        status = main(["check", f"{path}:factory", "--variant", "condconv_layer",
                       "--examples", "30"])
        forward_only = main(["check", f"{path}:pair", "--variant", "condconv_layer",
                             "--examples", "30", "--forward-only"])
    finally:
        sys.path.remove(str(EXAMPLES))
    out = capsys.readouterr().out
    assert status == 1 and forward_only == 1
    assert f"condconv_layer ({SECOND_ORDER}, float64, seed 0): FAILED" in out
    assert "condconv_layer (forward, float64, seed 0): FAILED" in out
    assert "minimal failing case:" in out
    assert "padding_mode='zeros'" in out
    assert re.search(r"output: has shape \(1, \d+, \d+, \d+\), expected", out)


WITHOUT_JVP_RULE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from condconv_torch import CondConv2d, build, PARAMETERS, SUPPORTS
    from condconv_ref.testing.torch_adapter import torch_implementation

    class Sigmoid(torch.autograd.Function):  # a backward rule, no jvp rule
        @staticmethod
        def forward(logits):
            return torch.sigmoid(logits)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            return grad * y * (1 - y)

    class CustomRouting(CondConv2d):
        def routing_weights(self, x):
            return Sigmoid.apply(self.routing(F.adaptive_avg_pool2d(x, 1).flatten(1)))

    def factory():
        return torch_implementation(build(CustomRouting), PARAMETERS, supports=SUPPORTS)
''')


def test_check_command_checks_the_jvp_unless_told_not_to(tmp_path, capsys, monkeypatch):
    path = tmp_path / "custom_routing.py"
    path.write_text(WITHOUT_JVP_RULE)
    monkeypatch.syspath_prepend(str(EXAMPLES))  # where the layer imports its parent from
    argv = ["check", f"{path}:factory", "--variant", "condconv_layer", "--examples", "5"]
    checked, skipped = main(argv), main([*argv, "--no-jvp"])
    out = capsys.readouterr().out
    assert checked == 1 and skipped == 0
    assert f"condconv_layer ({SECOND_ORDER}, float64, seed 0): FAILED" in out
    assert re.search(r"jvp: raised \w+", out)
    assert "condconv_layer (forward, VJP and HVP, float64, seed 0): PASSED after 5 examples" in out


@pytest.mark.parametrize("script, factory, status, wrong", [
    ("check_jvp_rule.py", "wrong_rule_layer", 1, ["jvp"]),
    ("check_jvp_rule.py", "layer", 0, []),
    ("check_double_backward.py", "detached_layer", 1, ["hvp 'x'", "hvp 'route_weight'"]),
    ("check_double_backward.py", "layer", 0, []),
])
def test_the_derivative_how_tos_catch_the_wrong_rule_and_pass_the_right_one(script, factory,
                                                                            status, wrong, capsys):
    path = EXAMPLES.parent / "docs" / "howto" / script
    assert main(["check", f"{path}:{factory}", "--variant", "condconv_layer",
                 "--examples", "10"]) == status
    out = capsys.readouterr().out
    verdict = "FAILED" if status else "PASSED"
    assert f"condconv_layer ({SECOND_ORDER}, float64, seed 0): {verdict}" in out
    differing = re.findall(r"^  (\w[\w ']*?) (?:differs|has|raised)", out, flags=re.MULTILINE)
    assert differing == wrong


def test_check_command_checks_the_hvp_unless_told_not_to(capsys):
    path = EXAMPLES.parent / "docs" / "howto" / "check_double_backward.py"
    argv = ["check", f"{path}:detached_layer", "--variant", "condconv_layer", "--examples", "5"]
    assert main([*argv, "--no-hvp"]) == 0 and main([*argv, "--no-jvp"]) == 1
    out = capsys.readouterr().out
    assert f"condconv_layer ({FIRST_ORDER}, float64, seed 0): PASSED after 5 examples" in out
    assert "condconv_layer (forward, VJP and HVP, float64, seed 0): FAILED" in out


@pytest.mark.parametrize("argv, message", [
    (["check", "examples/condconv_torch.py", "--variant", "condconv"],
     "expected path/to/file.py:factory"),
    (["check", "no/such/file.py:factory", "--variant", "condconv"], "no such file"),
    (["check", f"{EXAMPLES / 'condconv_torch.py'}:nothing", "--variant", "condconv"],
     "has no callable 'nothing'"),
    (["check", f"{EXAMPLES / 'condconv_torch.py'}:build", "--variant", "condconv"],
     "build() raised TypeError"),
    (["check", "x.py:f", "--variant", "condconv2d"], "--variant"),
    (["check", "x.py:f", "--variant", "condconv", "--examples", "0"], "--examples"),
    (["check", "x.py:f"], "--variant"),
])
def test_check_command_usage_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert "error:" in line and message in line
    assert captured.out == ""
