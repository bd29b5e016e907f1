"""Fuzzing: invalid calls to every public function raise ValueError or TypeError, and nothing else.

Hypothesis draws a public function, builds a valid call to it (the variant
registry, :data:`condconv_ref.variants.VARIANTS`, knows how), then corrupts
exactly one thing, in one of the categories of :data:`CATEGORIES`: an
argument's rank, a shape against another argument, an empty axis, its dtype,
its namespace or device, its type (not an array), an option, or the ``params``
mapping of a layer.  Three properties must hold for every such call:

* it raises ``ValueError`` or ``TypeError`` whose message starts with the
  function's name and names one of its arguments;
* it never returns a result;
* it never writes to its inputs.

Every function in ``condconv_ref.__all__`` is covered: an array op through
its registered variant, a scalar function through :data:`SCALAR_FUZZ`.  A new
public function that is in neither fails
:func:`test_every_public_function_is_fuzzed`.

The corruptions are invalid by construction.  Shape corruptions take one array
from a second valid call whose configuration differs in one size (B, C, O, E,
spatial size, kernel size) and keep the others: only sizes that at least two
arrays of the call share are changed, so the call cannot be valid.  The sizes
of a call differ from each other, so that a changed rank cannot be read as
another valid layout (a per-example kernel, say) by coincidence.

The toolkit's entry points (checker, golden files, verify), the command line
and the table of docs/robustness.md are checked at the end, and last the
checker itself: an inventory of corrupted JVPs and HVPs
(:data:`DERIVATIVE_CORRUPTIONS`: a tangent dropped, a term's sign flipped, the
router's own second-order term dropped), each of which
``check_implementation`` must catch on every layer with a reference HVP.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import condconv_ref
from condconv_ref._attention import ODCONV_KEYS
from condconv_ref.backends import get_backend, to_numpy
from condconv_ref.testing import ConvConfig, check_implementation
from condconv_ref.variants import (
    VARIANTS,
    build_case,
    hvp_variants,
    reference_forward,
    reference_hvp,
    reference_jvp,
)
from derivative_cases import routers_without_second_order

FUNCTIONS = {name: obj for name in condconv_ref.__all__
             if callable(obj := getattr(condconv_ref, name))
             and not (inspect.isclass(obj) and issubclass(obj, BaseException))}
ARRAY_OPS = sorted(name for name in FUNCTIONS if name.removesuffix("_vjp") in VARIANTS)

# Several thousand generated calls in CI: examples per test x tests x backends.
FUZZ = settings(max_examples=4 * settings.default.max_examples,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_1D = ConvConfig(batch=2, in_channels=3, out_channels=5, groups=1, spatial=(11,), kernel=(4,),
                 stride=(1,), dilation=(1,), padding=0, padding_mode="zeros", n_experts=7,
                 bias=True)
_2D = replace(_1D, spatial=(11, 13), kernel=(4, 6), stride=(1, 1), dilation=(1, 1))
CONFIGS = {"1d": _1D, "2d": _2D}
# One size at a time changed to a value no other size of the call has.
RESIZES = {
    "batch": lambda c: replace(c, batch=13),
    "channels": lambda c: replace(c, in_channels=17, groups=17 if c.groups > 1 else 1,
                                  out_channels=34 if c.groups > 1 else c.out_channels),
    "out_channels": lambda c: replace(c, out_channels=19 if c.groups == 1 else 3 * c.groups),
    "experts": lambda c: replace(c, n_experts=23),
    "spatial": lambda c: replace(c, spatial=(29,) + c.spatial[1:]),
    "kernel": lambda c: replace(c, kernel=(9,) + c.kernel[1:]),
}


def _config(variant: str, key: str) -> ConvConfig:
    config = CONFIGS[key]
    if VARIANTS[variant].depthwise:
        config = replace(config, groups=config.in_channels, out_channels=2 * config.in_channels)
    return config


# ---------------------------------------------------------------- valid calls

UNSET = object()


@dataclass
class Call:
    """One call of public function ``name``: arrays by name, options, and how to pass them."""

    name: str
    arrays: dict[str, Any]
    options: dict[str, Any]
    layer: bool
    params: Any = field(default=UNSET)  # replaces the layer's params mapping when set

    @property
    def function(self) -> Callable[..., Any]:
        return FUNCTIONS[self.name]

    def invoke(self) -> Any:
        arrays = dict(self.arrays)
        lead = [arrays.pop("cotangent")] if "cotangent" in arrays else []
        if self.layer:
            x = arrays.pop("x")
            return self.function(*lead, x, arrays if self.params is UNSET else self.params,
                                 **self.options)
        return self.function(*lead, **arrays, **self.options)

    def argument_names(self) -> set[str]:
        return set(inspect.signature(self.function).parameters) | set(self.arrays)


@cache
def _numpy_call(name: str, key: str, resize: str | None = None) -> Call:
    """The valid call of ``name`` on config ``key`` (optionally resized), in float64 NumPy."""
    variant = name.removesuffix("_vjp")
    config = _config(variant, key)
    if resize is not None:
        config = RESIZES[resize](config)
    case = build_case(variant, config, seed=0, temperature=1.5)
    arrays = dict(case.arrays)
    if name.endswith("_vjp"):
        output = reference_forward(case)
        arrays = {"cotangent": np.linspace(-1.0, 1.0, output.size).reshape(output.shape),
                  **arrays}
    return Call(name, arrays, dict(case.options), case.layer)


@cache
def _backend_call(backend_name: str, name: str, key: str, resize: str | None = None) -> Call:
    backend = get_backend(backend_name)
    call = _numpy_call(name, key, resize)
    return replace(call, arrays={k: backend.asarray(a) for k, a in call.arrays.items()})


def valid_call(backend, name: str, key: str, resize: str | None = None) -> Call:
    call = _backend_call(backend.name, name, key, resize)
    return replace(call, arrays=dict(call.arrays), options=dict(call.options))


def test_valid_calls_succeed(backend):
    """The uncorrupted calls the fuzzers start from are valid: corruptions make them invalid."""
    for name in ARRAY_OPS:
        for key in CONFIGS:
            result = valid_call(backend, name, key).invoke()
            assert result is not None


# ---------------------------------------------------------------- the properties


def snapshot(call: Call) -> dict[str, Any]:
    """NumPy copies of every input array, those of a replaced params mapping included."""
    copies = {name: np.array(to_numpy(a), copy=True) for name, a in call.arrays.items()
              if hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, str)}
    if isinstance(call.params, Mapping):
        copies.update({f"params[{k!r}]": np.array(to_numpy(v), copy=True)
                       for k, v in call.params.items() if hasattr(v, "dtype")})
    return copies


def assert_rejected(call: Call, what: str) -> None:
    """The call raises ValueError/TypeError naming function and an argument; inputs unchanged."""
    before = snapshot(call)
    try:
        result = call.invoke()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert message.startswith(f"{call.name}: "), (
            f"{call.name} with {what}: message does not start with the function name: "
            f"{type(error).__name__}: {message}")
        named = [arg for arg in call.argument_names() if re.search(rf"\b{arg}\b", message)]
        assert named, f"{call.name} with {what}: message names no argument: {message}"
    except Exception as error:  # noqa: BLE001 - the property is that nothing else escapes
        raise AssertionError(f"{call.name} with {what} raised {type(error).__name__}: {error}"
                             ) from error
    else:
        raise AssertionError(f"{call.name} with {what} returned a result of type "
                             f"{type(result).__name__} instead of raising")
    finally:
        after = snapshot(call)
        for name, copy in before.items():
            assert np.array_equal(after[name], copy, equal_nan=True), (
                f"{call.name} with {what} modified its input {name}")


# ---------------------------------------------------------------- corruptions


def array_arguments(call: Call) -> list[str]:
    return list(call.arrays)


OPTIONAL = {"bias", "route_bias", "fc1_bias", "fc2_bias",
            *(name for name, needed in ODCONV_KEYS.items() if not needed)}


def required(call: Call, argument: str) -> bool:
    """Whether ``argument`` may not be None (optional arrays default to None)."""
    parameter = inspect.signature(call.function).parameters.get(argument)
    if parameter is not None:
        return parameter.default is inspect.Parameter.empty
    return argument not in OPTIONAL


# Arguments whose rank is free within a range when the rest of the call is fixed.
VALID_RANKS = {
    ("route_sigmoid", "x"): {2, 3, 4, 5},
    ("route_softmax", "x"): {2, 3, 4, 5},
    ("route_sigmoid_vjp", "x"): {2, 3, 4, 5},
    ("route_softmax_vjp", "x"): {2, 3, 4, 5},
    ("mix_experts", "experts"): set(range(1, 33)),
}


def with_rank(xp: Any, a: Any, how: str) -> Any:
    if how == "scalar":
        return xp.reshape(a, (-1,))[0]
    if how == "leading axis":
        return xp.expand_dims(a, axis=0)
    if how == "trailing axis":
        return xp.expand_dims(a, axis=a.ndim)
    return a[..., 0]  # "drop last axis"


@st.composite
def rank_corruptions(draw, backend, call: Call) -> tuple[Call, str]:
    argument = draw(st.sampled_from(array_arguments(call)))
    a = call.arrays[argument]
    hows = ["scalar", "leading axis", "trailing axis"] + (["drop last axis"] if a.ndim > 1 else [])
    free = VALID_RANKS.get((call.name, argument), {a.ndim})
    new_rank = {"scalar": 0, "leading axis": a.ndim + 1, "trailing axis": a.ndim + 1,
                "drop last axis": a.ndim - 1}
    hows = [how for how in hows if new_rank[how] not in free]
    how = draw(st.sampled_from(hows))
    call.arrays[argument] = with_rank(backend.xp, a, how)
    return call, f"{argument} given a {how} (shape {tuple(call.arrays[argument].shape)})"


@st.composite
def shape_corruptions(draw, backend, call: Call, key: str) -> tuple[Call, str]:
    choices = []
    for resize in RESIZES:
        other = _numpy_call(call.name, key, resize)
        changed = [name for name, a in other.arrays.items()
                   if a.shape != _numpy_call(call.name, key).arrays[name].shape]
        if len(changed) >= 2:
            choices += [(resize, name) for name in changed]
    resize, argument = draw(st.sampled_from(choices))
    call.arrays[argument] = valid_call(backend, call.name, key, resize).arrays[argument]
    return call, (f"{argument} of shape {tuple(call.arrays[argument].shape)} from a call "
                  f"with another {resize} size")


@st.composite
def empty_corruptions(draw, backend, call: Call) -> tuple[Call, str]:
    argument = draw(st.sampled_from(array_arguments(call)))
    a = call.arrays[argument]
    axis = draw(st.integers(0, a.ndim - 1))
    call.arrays[argument] = a[(slice(None),) * axis + (slice(0, 0), ...)]
    return call, (f"{argument} with a zero-size axis {axis} "
                  f"(shape {tuple(call.arrays[argument].shape)})")


DTYPES = ["int64", "int32", "bool", "complex128", "float32", "float16"]


@st.composite
def dtype_corruptions(draw, backend, call: Call) -> tuple[Call, str]:
    argument = draw(st.sampled_from(array_arguments(call)))
    available = [name for name in DTYPES if hasattr(backend.xp, name)]
    dtype = draw(st.sampled_from(available))
    call.arrays[argument] = backend.xp.astype(call.arrays[argument], getattr(backend.xp, dtype))
    return call, f"{argument} as {dtype}"


def _foreign(backend) -> list[str]:
    """Backends whose arrays must not be mixed with ``backend``'s."""
    others = {"numpy": ["array_api_strict", "torch"], "torch": ["numpy", "array_api_strict"],
              "array_api_strict": ["numpy", "torch", "array_api_strict:device1"],
              "array_api_strict:device1": ["numpy", "array_api_strict"]}
    return others.get(backend.name, ["numpy"])


@st.composite
def namespace_corruptions(draw, backend, call: Call) -> tuple[Call, str]:
    argument = draw(st.sampled_from(array_arguments(call)))
    other = draw(st.sampled_from(_foreign(backend)))
    try:
        other_backend = get_backend(other)
    except Exception:  # noqa: BLE001 - an unavailable backend: mix with NumPy instead
        other_backend = get_backend("numpy" if backend.name != "numpy" else "array_api_strict")
    call.arrays[argument] = other_backend.asarray(to_numpy(call.arrays[argument]))
    return call, f"{argument} from {other_backend.name} among {backend.name} arrays"


NOT_ARRAYS = {
    "a nested list": lambda a: to_numpy(a).tolist(),
    "a float": lambda a: 1.0,
    "an int": lambda a: 2,
    "a bool": lambda a: True,
    "a string": lambda a: "x",
    "None": lambda a: None,
    "a dict": lambda a: {"value": a},
    "an object": lambda a: object(),
}


@st.composite
def type_corruptions(draw, backend, call: Call) -> tuple[Call, str]:
    argument = draw(st.sampled_from(array_arguments(call)))
    kinds = [kind for kind in NOT_ARRAYS if kind != "None" or required(call, argument)]
    kind = draw(st.sampled_from(kinds))
    call.arrays[argument] = NOT_ARRAYS[kind](call.arrays[argument])
    return call, f"{argument} as {kind}"


def _bad_options(call: Call, key: str) -> dict[str, list[Any]]:
    """Bad values for each option the function takes; each is invalid whatever the rest is."""
    nd = len(CONFIGS[key].spatial)
    size = CONFIGS[key].spatial[0]
    per_dim_bad = [0, -1, 1.5, True, "1", None, math.nan, (1,) * (nd + 1), (), [0] * nd,
                   (1.0,) * nd, ("a",) * nd]
    bad = {
        "stride": per_dim_bad,
        "dilation": per_dim_bad + [50],  # a dilated kernel larger than the padded input
        "padding": [-1, "full", "SAME", "", None, 1.5, True, math.inf, ((1, 2, 3),) * nd,
                    ((-1, 0),) * nd, ((1,),) * nd, (1,) * (nd + 1), [[1, 1]] * (nd + 1),
                    ((1.5, 0),) * nd, ("a",) * nd, ((True, 0),) * nd],
        "padding_mode": ["mirror", "", None, 0, "Zeros", "REFLECT", ("zeros",)],
        "groups": [0, -1, 2, 1.0, True, "1", None, (1,)],
        "depth_multiplier": [0, -1, 1.5, True, None, "2", 3],
        "temperature": [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "1", None, True, 1j],
    }
    combos = {
        "reflect padding as large as the input": {"padding": size, "padding_mode": "reflect"},
        "circular padding larger than the input": {"padding": size + 1,
                                                   "padding_mode": "circular"},
    }
    taken = inspect.signature(call.function).parameters
    choices = {(name, repr(value)): {name: value} for name, values in bad.items() if name in taken
               for value in values}
    if "padding_mode" in taken:
        choices.update({(label, ""): options for label, options in combos.items()})
    return choices


@st.composite
def option_corruptions(draw, backend, call: Call, key: str) -> tuple[Call, str]:
    choices = _bad_options(call, key)
    label = draw(st.sampled_from(sorted(choices)))
    call.options.update(choices[label])
    return call, f"option {label[0]}={label[1]}" if label[1] else label[0]


@st.composite
def params_corruptions(draw, backend, call: Call) -> tuple[Call, str]:
    params = {name: a for name, a in call.arrays.items() if name not in ("x", "cotangent")}
    needed = [name for name in params if name not in OPTIONAL]
    first = draw(st.sampled_from(needed))
    corruptions = {
        "a list of arrays": list(params.values()),
        "a tuple of arrays": tuple(params.values()),
        "None": None,
        "an array": call.arrays["x"],
        "an empty dict": {},
        f"a dict without {first!r}": {k: v for k, v in params.items() if k != first},
        f"a dict with {first!r} set to None": {**params, first: None},
        "a dict with an unknown key": {**params, "gate": params[first]},
        "a dict with a non-string key": {**params, 0: params[first]},
        f"a dict with {first!r} as a list": {**params, first: to_numpy(params[first]).tolist()},
    }
    label = draw(st.sampled_from(sorted(corruptions)))
    call.params = corruptions[label]
    return call, f"params as {label}"


CATEGORIES = {
    "rank": lambda backend, call, key: rank_corruptions(backend, call),
    "shape": shape_corruptions,
    "empty": lambda backend, call, key: empty_corruptions(backend, call),
    "dtype": lambda backend, call, key: dtype_corruptions(backend, call),
    "namespace": lambda backend, call, key: namespace_corruptions(backend, call),
    "type": lambda backend, call, key: type_corruptions(backend, call),
    "options": option_corruptions,
    "params": lambda backend, call, key: params_corruptions(backend, call),
}


def applicable(category: str, name: str, key: str) -> bool:
    call = _numpy_call(name, key)
    if category == "params":
        return call.layer
    if category == "options":
        return bool(_bad_options(call, key))
    return True


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_invalid_calls_raise_value_or_type_error_and_leave_inputs_alone(backend, category):
    targets = [(name, key) for name in ARRAY_OPS for key in CONFIGS
               if applicable(category, name, key)]

    @FUZZ
    @given(data=st.data())
    def fuzz(data):
        name, key = data.draw(st.sampled_from(targets), label="function, config")
        call = valid_call(backend, name, key)
        corrupted, what = data.draw(CATEGORIES[category](backend, call, key), label="corruption")
        assert_rejected(corrupted, what)

    fuzz()


# ---------------------------------------------------------------- scalar functions


def _scalar_calls() -> dict[str, list[tuple[tuple, dict]]]:
    good = {"step": 3, "start": 30.0, "end": 1.0, "anneal_steps": 10}
    bad = [-1, math.nan, math.inf, -math.inf, "1", None, True, 1j]
    calls = []
    for argument in good:
        for value in bad + ([0, 0.0] if argument != "step" else []):
            if argument == "step" and value == math.inf:
                continue
            kwargs = {**good, argument: value}
            step = kwargs.pop("step")
            calls.append(((step,), kwargs))
    budgets = [((value,), {}) for value in (0, -1, 1.5, True, "1", math.nan, [1])]
    return {"temperature_schedule": calls, "set_memory_budget": budgets,
            "memory_budget": budgets, "get_memory_budget": []}


SCALAR_FUZZ = _scalar_calls()


@pytest.mark.parametrize("name", sorted(SCALAR_FUZZ))
def test_scalar_functions_reject_bad_values(name):
    for args, kwargs in SCALAR_FUZZ[name]:
        call = Call(name, {}, {}, layer=False)
        call.invoke = lambda args=args, kwargs=kwargs: FUNCTIONS[name](*args, **kwargs)
        call.argument_names = lambda: set(inspect.signature(FUNCTIONS[name]).parameters)
        assert_rejected(call, f"{args} {kwargs}")


# The JVPs take a tangents mapping first, which the corruptions here do not build yet; their
# bad tangents are tested in tests/test_jvp.py (test_bad_tangents_are_clear_errors) and their
# other arguments pass through the same check functions as the ops fuzzed here.
JVPS = {name for name in FUNCTIONS if name.removesuffix("_jvp") in VARIANTS
        and name.endswith("_jvp")}
# The layers' HVPs likewise (a cotangent and tangents first): tests/test_hvp.py
# (test_bad_tangents_and_cotangents_are_clear_errors).
HVPS = {name for name in FUNCTIONS if name.removesuffix("_hvp") in VARIANTS
        and name.endswith("_hvp")}


def test_every_public_function_is_fuzzed():
    assert set(FUNCTIONS) == set(ARRAY_OPS) | set(SCALAR_FUZZ) | JVPS | HVPS, (
        "register a variant (condconv_ref.variants.VARIANTS) or a SCALAR_FUZZ entry for: "
        f"{sorted(set(FUNCTIONS) - set(ARRAY_OPS) - set(SCALAR_FUZZ) - JVPS - HVPS)}")


# ---------------------------------------------------------------- the toolkit's entry points


def _entry_point_calls():
    from condconv_ref import golden, verify
    from condconv_ref.testing import check_implementation

    def check(**kwargs):
        return check_implementation(lambda case: None, **{"variant": "condconv", **kwargs})

    bad = {
        "check_implementation": (check, [{"variant": "nope"}, {"dtype": "int8"},
                                         {"max_examples": 0}, {"max_examples": 1.5},
                                         {"seed": -1}, {"backend": "nope"}]),
        "golden.write": (lambda **kw: golden.write("/nonexistent/golden", **kw),
                         [{"cases": 0}, {"cases": True}, {"seed": -1}, {"dtype": "int8"},
                          {"variants": ["nope"]}, {"variants": "condconv"}]),
        "golden.verify": (lambda **kw: golden.verify(golden.SHIPPED, **kw),
                          [{"backend": "nope"}, {"backend": None}, {"variants": ["nope"]},
                           {"variants": "condconv"}]),
        "verify": (lambda **kw: verify.run(**kw),
                   [{"cases": 0}, {"cases": 1.5}, {"seed": -1}, {"dtype": "int8"},
                    {"backend": "nope"}, {"backend": 3}]),
    }
    return [(name, function, kwargs) for name, (function, calls) in bad.items()
            for kwargs in calls]


ENTRY_POINT_CALLS = _entry_point_calls()


@pytest.mark.parametrize(("name", "function", "kwargs"), ENTRY_POINT_CALLS,
                         ids=[f"{name}-{kwargs}" for name, _, kwargs in ENTRY_POINT_CALLS])
def test_toolkit_entry_points_reject_bad_arguments(name, function, kwargs):
    with pytest.raises((ValueError, TypeError)) as caught:
        function(**kwargs)
    assert str(caught.value).startswith((f"{name}: ", "get_backend: ")), caught.value
    # "variants" may be named as "unknown variant 'nope'"
    assert any(argument.rstrip("s") in str(caught.value) for argument in kwargs), caught.value


# ---------------------------------------------------------------- the command line

# Per subcommand, arguments that argparse accepts but the handler must reject as bad input.
CLI_BAD_INPUT = {
    "verify": ["--backend", "cupy"],               # unavailable here (skipped where CuPy runs)
    "golden": ["verify", "/nonexistent/golden"],
    "check": ["/nonexistent/layer.py:make", "--variant", "condconv"],
    "gpu-check": ["--cases", "1", "--no-tf32"],    # needs CuPy and a GPU
}


def _subcommands() -> list[str]:
    from condconv_ref.cli import build_parser

    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return sorted(action.choices)


@pytest.mark.parametrize("how", ["unknown option", "bad input"])
@pytest.mark.parametrize("subcommand", _subcommands())
def test_cli_bad_input_is_one_line_and_exit_2(subcommand, how, capsys):
    from condconv_ref.cli import main

    assert subcommand in CLI_BAD_INPUT, f"add bad input for condconv-ref {subcommand}"
    if how == "bad input" and subcommand in ("verify", "gpu-check"):
        try:
            import cupy  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("CuPy is available: the input is not bad here")
    argv = [subcommand] + (["--no-such-option"] if how == "unknown option"
                           else CLI_BAD_INPUT[subcommand])
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("condconv-ref"), err
    assert "Traceback" not in err


# ---------------------------------------------------------------- the documented table

ROBUSTNESS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "robustness.md"
TABLE_ROW = re.compile(r"^\|[^|]*\| `(?P<call>.+?)` \| `(?P<kind>\w+): (?P<message>.+)` \|$")


def _documented_errors() -> list[tuple[str, str, str]]:
    rows = [TABLE_ROW.match(line) for line in ROBUSTNESS_PAGE.read_text().splitlines()]
    return [(row["call"], row["kind"], row["message"]) for row in rows if row]


def test_the_documented_errors_are_the_errors_raised():
    """Every example of docs/robustness.md's table raises exactly the error it shows.

    The page's examples are NumPy examples (and array-api-strict for the two
    namespace and device rows), so this test takes no backend fixture."""
    import array_api_strict

    experts = np.ones((5, 4, 3, 3))
    names = {"np": np, "strict": array_api_strict, "x": np.ones((2, 3, 8)),
             "kernel": np.ones((4, 3, 3)), "experts": experts, "routing": np.ones((2, 5)),
             "dw_experts": np.ones((5, 6, 1, 3)), "fc1": np.ones((2, 3)), "fc2": np.ones((5, 2)),
             "params": {"experts": experts, "route_weight": np.ones((5, 3))},
             **{name: getattr(condconv_ref, name) for name in condconv_ref.__all__}}
    rows = _documented_errors()
    assert len(rows) >= 30
    for call, kind, message in rows:
        with pytest.raises(Exception) as caught:
            eval(call, names)  # noqa: S307 - the page's own examples
        assert type(caught.value).__name__ == kind, (call, caught.value)
        text = str(caught.value)
        if message.endswith("…"):
            assert text.startswith(message[:-1]), (call, text)
        else:
            assert text == message, (call, text)


# ---------------------------------------------------------------- corrupted derivatives

# A corruption of the reference's JVP or HVP, one mistake each, of the kinds hand-written (and
# framework-differentiated) derivatives make; check_implementation must catch every one on
# every layer with a reference HVP.  Each is a function of the reference's derivative in the
# case's dtype, returning the wrong one.


def _flipped(tangents, name):
    return {key: -t if key == name else t for key, t in tangents.items()}


def _dropped(tangents, name):
    return {key: t for key, t in tangents.items() if key != name}


def _without_the_routers_own_term(case, cotangent, tangents):
    """The HVP without the router's own second-order term (ODConv: its heads' sigmoids' and
    softmax's), the derivative of the router's VJP at a fixed routing gradient."""
    from condconv_ref import _attention

    with pytest.MonkeyPatch().context() as patch:
        if case.variant == "odconv_layer":
            for term in ("sigmoid_vjp_derivative", "stable_softmax_vjp_derivative"):
                original = getattr(_attention, term)
                patch.setattr(_attention, term,
                              lambda *a, original=original, **k: 0 * original(*a, **k))
            return reference_hvp(case, cotangent, tangents, dtype=case.dtype)
        with routers_without_second_order(case.variant, patch):
            return reference_hvp(case, cotangent, tangents, dtype=case.dtype)


DERIVATIVE_CORRUPTIONS = {
    "jvp: the input's tangent dropped": ("jvp", lambda case, tangents: reference_jvp(
        case, _dropped(tangents, "x"), dtype=case.dtype)),
    "jvp: the experts' term's sign flipped": ("jvp", lambda case, tangents: reference_jvp(
        case, _flipped(tangents, "experts"), dtype=case.dtype)),
    "jvp: twice the routing weights' term": ("jvp", lambda case, tangents: reference_jvp(
        case, {**tangents, **{name: 2 * t for name, t in tangents.items()
                              if name not in ("x", "experts", "bias")}}, dtype=case.dtype)),
    "hvp: the input's tangent dropped": ("hvp", lambda case, c, tangents: reference_hvp(
        case, c, _dropped(tangents, "x"), dtype=case.dtype)),
    "hvp: the experts' term's sign flipped": ("hvp", lambda case, c, tangents: reference_hvp(
        case, c, _flipped(tangents, "experts"), dtype=case.dtype)),
    "hvp: the router's own second-order term dropped": ("hvp", _without_the_routers_own_term),
}


@pytest.mark.parametrize("variant", hvp_variants())
def test_the_uncorrupted_reference_derivatives_pass(variant):
    report = check_implementation(reference_forward, variant=variant, max_examples=10,
                                  jvp=lambda case, t: reference_jvp(case, t, dtype=case.dtype),
                                  hvp=lambda case, c, t: reference_hvp(case, c, t,
                                                                       dtype=case.dtype))
    assert report.passed and report.checked_jvp and report.checked_hvp


@pytest.mark.parametrize("variant", hvp_variants())
@pytest.mark.parametrize("corruption", list(DERIVATIVE_CORRUPTIONS))
def test_the_checker_catches_every_corrupted_derivative(variant, corruption):
    what, corrupted = DERIVATIVE_CORRUPTIONS[corruption]
    report = check_implementation(reference_forward, variant=variant, max_examples=30,
                                  raise_on_failure=False, **{what: corrupted})
    assert not report.passed, f"{corruption} passed on {variant}: {report}"
    assert all(m.what.split(" ")[0] == what for m in report.mismatches), report
    assert max(m.units for m in report.mismatches) > 1e3, report
