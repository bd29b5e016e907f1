"""The shape every op follows: one namespace resolution per call, no reach into sibling privates.

Each public op and VJP resolves the array namespace exactly once, at its
public boundary, and hands ``xp`` down; shared helpers live in ``_``-named
internal modules, so no module imports a ``_private`` name from a public one.
"""

from __future__ import annotations

import ast
import os
import inspect
import pathlib
import subprocess
import sys

import array_api_compat
import numpy as np
import pytest

import condconv_ref


def _arrays(backend, shapes):
    rng = np.random.default_rng(0)
    return {name: backend.asarray(rng.uniform(0.1, 1.0, size=shape), dtype="float64")
            for name, shape in shapes.items()}


# Valid arguments for every public op taking arrays: (shapes of its arrays, params keys, options).
X, X_LINEAR = (2, 4, 6), (2, 4)
_CONDCONV = {"x": X, "experts": (3, 5, 4, 3), "routing": (2, 3), "bias": (3, 5)}
_DEPTHWISE = {"x": X, "experts": (3, 8, 1, 3), "routing": (2, 3), "bias": (3, 8)}
_LINEAR = {"x": X_LINEAR, "experts": (3, 5, 4), "routing": (2, 3), "bias": (3, 5)}
_SIGMOID_PARAMS = {"route_weight": (3, 4), "route_bias": (3,)}
_SOFTMAX = {"fc1_weight": (2, 4), "fc2_weight": (3, 2), "fc1_bias": (2,), "fc2_bias": (3,)}
CALLS = {
    "conv": ({"x": X, "kernel": (5, 4, 3), "bias": (5,)}, None, {}),
    "mix_experts": ({"routing": (2, 3), "experts": (3, 5, 4)}, None, {}),
    "condconv": (_CONDCONV, None, {}),
    "moe_condconv": (_CONDCONV, None, {}),
    "depthwise_condconv": (_DEPTHWISE, None, {"depth_multiplier": 2}),
    "cond_linear": (_LINEAR, None, {}),
    "moe_cond_linear": (_LINEAR, None, {}),
    "route_sigmoid": ({"x": X, "weight": (3, 4), "bias": (3,)}, None, {}),
    "route_softmax": ({"x": X, **_SOFTMAX}, None, {}),
    "condconv_layer": ({"x": X}, {"experts": (3, 5, 4, 3), "bias": (3, 5), **_SIGMOID_PARAMS},
                       {}),
    "depthwise_condconv_layer": ({"x": X}, {"experts": (3, 8, 1, 3), "bias": (3, 8),
                                            **_SIGMOID_PARAMS}, {"depth_multiplier": 2}),
    "cond_linear_layer": ({"x": X_LINEAR}, {"experts": (3, 5, 4), "bias": (3, 5),
                                            **_SIGMOID_PARAMS}, {}),
    "dynamic_conv_layer": ({"x": X}, {"experts": (3, 5, 4, 3), "bias": (3, 5), **_SOFTMAX},
                           {"temperature": 2.0}),
    "odconv_layer": ({"x": X}, {"experts": (3, 5, 4, 3), "fc_weight": (2, 4), "bn_weight": (2,),
                                "bn_bias": (2,), "channel_weight": (4, 2), "filter_weight": (5, 2),
                                "spatial_weight": (3, 2), "kernel_weight": (3, 2),
                                "kernel_bias": (3,)}, {"batch_norm": "train"}),
}
HVP_LAYERS = ("condconv_layer", "depthwise_condconv_layer", "cond_linear_layer",
              "dynamic_conv_layer", "odconv_layer")
PUBLIC_OPS = sorted([*CALLS, *(name + "_vjp" for name in CALLS), *(name + "_jvp" for name in CALLS),
                     *(name + "_hvp" for name in HVP_LAYERS)])
"""Every op has a VJP and a JVP, and each layer in HVP_LAYERS a Hessian-vector product: a new
op without them fails test_every_public_op_taking_arrays_is_counted."""


def test_every_public_op_taking_arrays_is_counted():
    takes_arrays = {
        name for name in condconv_ref.__all__
        if inspect.isfunction(getattr(condconv_ref, name))
        and {"x", "routing"} & set(inspect.signature(getattr(condconv_ref, name)).parameters)
    }
    assert takes_arrays == set(PUBLIC_OPS)


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_each_public_op_resolves_the_namespace_once(backend, name, monkeypatch):
    op = name.removesuffix("_vjp").removesuffix("_jvp").removesuffix("_hvp")
    shapes, param_shapes, options = CALLS[op]
    args = list(_arrays(backend, shapes).values())
    if param_shapes is not None:
        args.append(_arrays(backend, param_shapes))
    output = getattr(condconv_ref, op)(*args, **options)
    if name.endswith(("_jvp", "_hvp")):  # a tangent for every argument
        args.insert(0, _arrays(backend, {**shapes, **(param_shapes or {})}))
    if name.endswith(("_vjp", "_hvp")):  # and the cotangent first
        args.insert(0, backend.asarray(np.ones(tuple(output.shape)), dtype="float64"))
    resolve = array_api_compat.array_namespace
    calls = []

    def counting(*arrays, **kwargs):
        calls.append(len(arrays))
        return resolve(*arrays, **kwargs)

    monkeypatch.setattr(array_api_compat, "array_namespace", counting)
    getattr(condconv_ref, name)(*args, **options)
    assert len(calls) == 1


PACKAGE = pathlib.Path(condconv_ref.__file__).parent


def _is_public_module(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split(".")[1:])


def _is_module(folder, name):
    """``name`` is a module or package of ``folder`` (importing an internal module by name,
    ``from condconv_ref import _scales``, is how shared helpers are reached)."""
    return (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()


def test_no_module_imports_a_private_name_from_a_public_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] == "condconv_ref"
                    and _is_public_module(node.module)):
                folder = PACKAGE.parent.joinpath(*node.module.split("."))
                offenders += [f"{path.relative_to(PACKAGE.parent)}: from {node.module} import "
                              f"{alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")
                              and not _is_module(folder, alias.name)]
    assert offenders == []


# The modules that compute: those defining a public op, and the engine they share.  They reach
# arrays only through the namespace of their inputs, so the same code runs on every backend
# (the error model, the case builders and the tooling around them may use NumPy on the host).
ENGINE_MODULES = ("_attention", "_conv_engine", "_conv_parts", "_flat", "_gather", "_im2col",
                  "_layer", "_mixing", "_routing", "_tangent")


def test_the_modules_that_compute_never_import_numpy():
    modules = {getattr(condconv_ref, name).__module__.split(".")[-1] for name in PUBLIC_OPS}
    assert "condconv" in modules and "odconv" in modules
    offenders = []
    for module in sorted(modules | set(ENGINE_MODULES)):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
        offenders += [f"{module}: line {node.lineno}" for node in ast.walk(tree)
                      if (isinstance(node, ast.Import)
                          and any(alias.name.split(".")[0] == "numpy" for alias in node.names))
                      or (isinstance(node, ast.ImportFrom) and node.module
                          and node.module.split(".")[0] == "numpy")]
    assert offenders == []


@pytest.mark.parametrize(("name", "module", "framework"), [
    ("torch_implementation", "torch_adapter", "torch"),
    ("jax_implementation", "jax_adapter", "jax")])
def test_the_testing_package_exports_each_adapter_without_importing_its_framework(
        name, module, framework):
    code = ("import sys, condconv_ref.testing as testing; "
            f"from condconv_ref.testing import {name} as exported; "
            f"from condconv_ref.testing.{module} import {name} as defined; "
            "assert exported is defined, 'another function'; "
            f"assert {framework!r} not in sys.modules, '{framework} imported'")
    tree = str(PACKAGE.resolve().parent)  # the package under test
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [tree, os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, run.stderr
