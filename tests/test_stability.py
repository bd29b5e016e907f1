"""Numerical robustness of every op: extreme routing logits, the precision policy, NaN and inf,
and independence from the batch's order and split.

The policies tested here are documented in docs/robustness.md:

* results have the inputs' dtype; float16 inputs are computed in float32 and
  rounded once; float32 mixed with float64 is rejected, never promoted;
* a NaN or inf reaches exactly the outputs that read it, as in a convolution;
  through the global-average-pool routing of a layer it reaches its whole
  example, and never another example;
* permuting the batch permutes the results; splitting the batch in two gives
  the same per-example results (bitwise for NumPy convolutions), and
  batch-summed gradients that add up to the whole batch's.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import warnings
from dataclasses import replace

import array_api_compat
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from scipy import special

from condconv_ref import (
    condconv,
    conv,
    conv_vjp,
    depthwise_condconv,
    route_sigmoid,
    route_sigmoid_vjp,
    route_softmax,
    route_softmax_vjp,
)
from condconv_ref.backends import to_numpy
from condconv_ref.testing import ConvConfig, assert_close, conv_configs
from condconv_ref.variants import VARIANTS, Case, bind, build_case

FLOAT_DTYPES = ["float16", "float32", "float64"]
EPS = {"float16": 2.0**-10, "float32": 2.0**-23, "float64": 2.0**-52}
BATCHED = ("x", "routing", "cotangent")  # arguments and gradients with one entry per example

CONFIG = ConvConfig(batch=4, in_channels=4, out_channels=6, groups=2, spatial=(7, 6),
                    kernel=(3, 2), stride=(1, 2), dilation=(2, 1), padding=1,
                    padding_mode="reflect", n_experts=3, bias=True)


def dtype_on(backend, name: str):
    if not hasattr(backend.xp, name):
        pytest.skip(f"{backend.name} has no {name}")
    return getattr(backend.xp, name)


@contextlib.contextmanager
def no_warnings():
    """Any warning (overflow, invalid value, ...) inside is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def case_of(variant: str, config: ConvConfig = CONFIG) -> Case:
    if VARIANTS[variant].depthwise:
        config = replace(config, groups=config.in_channels, out_channels=2 * config.in_channels)
    return build_case(variant, config, seed=3, temperature=1.3)


def run(case: Case, backend, dtype: str = "float64", *, vjp: bool, cotangent=None,
        arrays=None):
    """The variant's forward (or VJP at ``cotangent``) on ``backend`` in ``dtype``."""
    entry = VARIANTS[case.variant]
    arrays = case.arrays_on(backend, dtype) if arrays is None else arrays
    if not vjp:
        return bind(entry.forward, case)(**arrays)
    return bind(entry.vjp, case, vjp=True)(cotangent, **arrays)


def cotangent_for(case: Case, backend, dtype: str = "float64"):
    output = run(case, "numpy", vjp=False)
    values = np.random.default_rng(7).standard_normal(output.shape)
    return backend.asarray(values, dtype=dtype)


def as_dict(result):
    return result if isinstance(result, dict) else {"output": result}


# ---------------------------------------------------------------- routing stability

extreme_logits = st.lists(
    st.one_of(st.sampled_from([-1e4, 1e4, 0.0]), st.floats(-1e4, 1e4)), min_size=1, max_size=6)
temperatures = st.floats(math.log(1e-3), math.log(1e3)).map(math.exp)


def rounded(values, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` and back to float64: what the op actually receives."""
    return np.asarray(values, dtype=dtype).astype(np.float64)


def assert_matches_reference(actual, reference: np.ndarray, scale: np.ndarray, dtype: str,
                             name: str) -> None:
    """Within ``8 eps(dtype) * scale`` (plus the subnormal spacing) of the float64 reference,
    where ``scale`` bounds the terms summed into each element (the same formula on absolute
    values): rounding errors are relative to the terms, not to a result that cancels.  Finite wherever the reference is
    representable in ``dtype`` (inf is the right rounding of an overflow)."""
    values = to_numpy(actual).astype(np.float64)
    representable = np.abs(reference) <= np.finfo(dtype).max / 2
    assert np.isfinite(values[representable]).all(), f"{name}: non-finite values {values}"
    # float16 results can be subnormal: their spacing is the smallest subnormal
    bound = (8 * EPS[dtype] * np.maximum(scale, np.abs(reference))
             + np.finfo(dtype).smallest_subnormal)
    error = np.abs(values - reference)
    assert (error <= bound)[representable].all(), (
        f"{name} in {dtype}: error {error} exceeds {bound}\n"
        f"actual {values}\nreference {reference}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(logits=extreme_logits)
# sigma(-91) is subnormal in float32 while the gradient is not; e^710 overflows float64.
@example(logits=[91.0])
@example(logits=[710.0])
def test_sigmoid_routing_is_finite_and_exact_for_extreme_logits(backend, dtype, logits, request):
    if backend.name == "jax" and dtype != "float16":  # float16's gradients are not subnormal
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="XLA's CPU backend flushes subnormal results to zero, so the "
                                "subnormal gradients of sigma at these logits come out as 0"))
    xp_dtype = dtype_on(backend, dtype)
    weight = rounded(logits, dtype)[:, None]                     # (E, C=1)
    x = np.array([[1.0], [-1.0]])                                # logits z and -z
    z = x @ weight.T
    cotangent = np.linspace(-1.0, 2.0, z.size).reshape(z.shape)
    args = [backend.asarray(a, dtype=dtype) for a in (x, weight)]
    with no_warnings():
        routing = route_sigmoid(*args)
        grads = route_sigmoid_vjp(backend.asarray(cotangent, dtype=dtype), *args)
    assert routing.dtype == xp_dtype
    ones = np.ones_like(z)
    assert_matches_reference(routing, special.expit(z), ones, dtype, "route_sigmoid")
    # sigma(z) sigma(-z) = e^-|z| / (1 + e^-|z|)^2, without expit(-z) = 1 / (1 + e^z)
    # overflowing e^z to inf (and its result to 0) for z > 709 in float64.
    tail = np.exp(-np.abs(z))
    grad_z = cotangent * tail / (1 + tail) ** 2
    # sigma(-|z|) that underflows into the subnormals carries an absolute error of up
    # to the smallest subnormal, not a relative one: in units of eps, per |cotangent|.
    terms_z = np.abs(grad_z) + np.abs(cotangent) * np.finfo(dtype).smallest_subnormal / EPS[dtype]
    assert_matches_reference(grads["weight"], grad_z.T @ x, terms_z.T @ np.abs(x), dtype,
                             "route_sigmoid_vjp weight")
    assert_matches_reference(grads["x"], grad_z @ weight, terms_z @ np.abs(weight),
                             dtype, "route_sigmoid_vjp x")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@given(logits=extreme_logits, temperature=temperatures)
# Close large logits: dividing by T before shifting would cost ~|z|/T eps in alpha.
@example(logits=[1e4, 1e4 - 1.0], temperature=0.7)
# alpha_0 ~ 2e-44 and its gradient ~3e-46: subnormal in float32, and the quotient by T
# underflows after the division; the second row saturates below longdouble's epsilon.
@example(logits=[0.0, 6440.0], temperature=64.0)
# T grad_z ~ 3.5e-46 underflows to 0 in float32 before the division by T = e^-2: the exact
# gradient 2.6e-45 comes out 0, two subnormal steps, inside one subnormal / T.
@example(logits=[0.0, 1.401298464324817e-45], temperature=math.exp(-2.0))
def test_softmax_routing_is_finite_and_exact_for_extreme_logits_and_temperatures(
        backend, dtype, logits, temperature):
    softmax_routing_matches_the_extended_precision_reference(backend, dtype, logits,
                                                             temperature)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("temperature", [1e-3, 1e-6])
@pytest.mark.parametrize("logits", [[1e34, 1e34, 0.0], [1e34, -1e34, 1e34], [3e30, -1e30, 3e30]],
                         ids=["tie-and-zero", "tie-and-opposite", "tie-at-1e30"])
def test_softmax_routing_with_a_tie_at_the_top_of_saturated_logits(backend, dtype, logits,
                                                                   temperature):
    """Logits of 1e34 with an exact tie at the top and T <= 1e-3: the gradient of each tied
    logit times its weight row overflowed to +-inf and their sum (exactly 0) came out NaN; the
    forward warned of an overflow dividing a gap of 1e34 by T = 1e-6 for an exact 0."""
    softmax_routing_matches_the_extended_precision_reference(backend, dtype, logits,
                                                             temperature)


def softmax_routing_matches_the_extended_precision_reference(backend, dtype, logits,
                                                             temperature):
    dtype_on(backend, dtype)
    fc2_weight = rounded(logits, dtype)[:, None]                 # (E, H=1)
    x, fc1_weight = np.array([[1.0], [0.5]]), np.array([[1.0]])  # hidden h = x, logits h z
    z = x @ fc2_weight.T
    cotangent = np.linspace(-1.0, 2.0, z.size).reshape(z.shape)
    args = [backend.asarray(a, dtype=dtype) for a in (x, fc1_weight, fc2_weight)]
    with no_warnings():
        routing = route_softmax(*args, temperature=temperature)
        grads = route_softmax_vjp(backend.asarray(cotangent, dtype=dtype), *args,
                                  temperature=temperature)
    # The reference shifts by the row maximum before dividing, in extended precision:
    # softmax(z / T) computed as z / T first carries an absolute error of about
    # |z| / T · eps in every exponent, the reference's own rounding, not the op's.
    z_long = z.astype(np.longdouble)
    weights = np.exp((z_long - z_long.max(axis=1, keepdims=True)) / temperature)
    alpha = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float64)
    assert_matches_reference(routing, alpha, np.ones_like(z), dtype, "route_softmax")
    sums = to_numpy(routing).astype(np.float64).sum(axis=1)
    assert np.abs(sums - 1).max() <= 8 * EPS[dtype] * len(logits)
    # The exact gradient is unchanged by shifting the cotangent by a constant per row
    # (the softmax Jacobian's rows sum to zero); shifted by its value at the largest
    # weight, <c, alpha> no longer cancels against c_m when the softmax saturates, which
    # even extended precision loses (1 - alpha_m below its epsilon).
    top = np.argmax(alpha, axis=1)[:, None]
    shifted = (cotangent - np.take_along_axis(cotangent, top, axis=1)).astype(np.longdouble)
    inner = (shifted * alpha).sum(axis=1, keepdims=True)
    grad_z = (alpha * (shifted - inner) / temperature).astype(np.float64)
    # Rounding model of grad_z_e = alpha_e (c_e - <c, alpha>) / T: exp(-u) carries a
    # relative error of about u eps, u = (max z - z) / T, and an alpha that underflows
    # into the subnormals an absolute one of up to the smallest subnormal.  With
    # a_e = alpha_e (1 + u_e) + subnormal / eps, the error of alpha_e in units of eps,
    # |d grad_z_e| <~ eps (a_e (|c_e| + <|c|, alpha>) + alpha_e <a, |c|>) / T.  The op forms
    # T grad_z, takes its products with the weights, and divides by T last (so that tied
    # saturated experts cannot overflow): T grad_z rounded into the subnormals errs by up to
    # the smallest subnormal, and so does each product with a weight that lands there; the
    # division by T magnifies both, hence one smallest subnormal / T before the products
    # and one after (assert_matches_reference adds the final quotient's own rounding).
    condition = 1 + (z.max(axis=1, keepdims=True) - z) / temperature
    subnormal = np.finfo(dtype).smallest_subnormal / EPS[dtype]
    budget = alpha * condition + subnormal
    terms_z = (budget * (np.abs(cotangent) + (np.abs(cotangent) * alpha).sum(axis=1, keepdims=True))
               + alpha * (budget * np.abs(cotangent)).sum(axis=1, keepdims=True)) / temperature
    terms_z = terms_z + subnormal / temperature
    assert_matches_reference(grads["fc2_weight"], grad_z.T @ x,
                             terms_z.T @ np.abs(x) + subnormal / temperature, dtype,
                             "route_softmax_vjp fc2_weight")
    assert_matches_reference(grads["x"], (grad_z @ fc2_weight) * (x > 0),
                             terms_z @ np.abs(fc2_weight) + subnormal / temperature, dtype,
                             "route_softmax_vjp x")



# ---------------------------------------------------------------- BLAS floating-point flags


class _StaleStack(ctypes.Structure):
    """64 KiB of float32 signalling NaNs, passed by value so that it is copied to the C stack."""

    _fields_ = [("words", ctypes.c_uint32 * 16384)]


_STALE = _StaleStack.from_buffer_copy(np.full(16384, 0x7F800001, dtype=np.uint32).tobytes())


def leave_signalling_nans_on_the_stack() -> None:
    """Leave signalling NaNs in the C stack below the caller, where the next calls' locals go.

    A by-value structure argument is copied to the stack by libffi; snprintf ignores the
    excess variadic argument.  Any earlier computation can leave such bytes there.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("stack poisoning through libc's snprintf is set up for Linux only")
    ctypes.CDLL(None).snprintf(None, ctypes.c_size_t(0), b"", _STALE)


def blas_reads_stale_stack() -> bool:
    """Whether this NumPy's BLAS raises FE_INVALID for a finite (2, 5) @ (5, 1) float32 product
    once the stack holds signalling NaNs: OpenBLAS's SkylakeX sgemv_t sums the 5 products of
    two rows in 4-lane registers whose lanes 2 and 3 read 3 floats of a stack buffer it never
    wrote (sgemv_kernel_t_5); the results are right, the flag is not."""
    a, b = np.ones((2, 5), dtype=np.float32), np.ones((5, 1), dtype=np.float32)
    for _ in range(5):
        leave_signalling_nans_on_the_stack()
        with np.errstate(invalid="raise"):
            try:
                a @ b
            except FloatingPointError:
                return True
    return False


def numpy_backed(backend) -> None:
    if not (array_api_compat.is_numpy_namespace(backend.xp)
            or array_api_compat.is_array_api_strict_namespace(backend.xp)):
        pytest.skip(f"{backend.name} does not report floating-point flags of its BLAS")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_routing_ignores_floating_point_flags_that_blas_raises_in_discarded_lanes(backend,
                                                                                  dtype):
    """Regression: ``pytest`` failed once in three runs with "invalid value encountered in
    matmul" in route_sigmoid_vjp (``grad_logits @ weight``, logits [1e4, -1e4, -1.7e-62, 1e4,
    5947.5], float32 on NumPy): the products are finite and right, but the BLAS kernel read
    stale stack memory in lanes it then discarded.  Every routing matmul with an inner
    dimension of 5 and 2 rows against one column goes through that kernel; none may warn."""
    numpy_backed(backend)
    if not blas_reads_stale_stack():
        pytest.skip("this BLAS raises no flags from stale stack memory for (2, 5) @ (5, 1) float32")
    rng = np.random.default_rng(5)

    def arrays(*shapes):
        return [backend.asarray(rng.uniform(-2.0, 2.0, size=shape), dtype=dtype)
                for shape in shapes]

    logits = rounded([1e4, -1e4, -1.7e-62, 1e4, 5947.5], dtype)[:, None]   # (E=5, C=1)
    x = backend.asarray(np.array([[1.0], [-1.0]]), dtype=dtype)
    weight = backend.asarray(logits, dtype=dtype)
    (cotangent,) = arrays((2, 5))
    x5, weight5 = arrays((2, 5), (1, 5))                           # (B, C=5) @ (5, E=1)
    fc1, fc2, softmax_cotangent = arrays((1, 5), (5, 1), (2, 5))   # C=5 -> H=1 -> E=5
    calls = {
        "route_sigmoid": lambda: route_sigmoid(x5, weight5),
        "route_sigmoid_vjp": lambda: route_sigmoid_vjp(cotangent, x, weight),
        "route_softmax": lambda: route_softmax(x5, fc1, fc2),
        "route_softmax_vjp": lambda: route_softmax_vjp(softmax_cotangent, x5, fc1, fc2),
    }
    expected = {name: call() for name, call in calls.items()}   # warm-up: first calls import
    for name, call in calls.items():
        for _ in range(5):
            leave_signalling_nans_on_the_stack()
            with no_warnings():
                result = call()
            for key, value in as_dict(result).items():
                assert np.array_equal(to_numpy(value), to_numpy(as_dict(expected[name])[key])), (
                    name, key)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_routing_still_warns_for_an_invalid_product_of_its_own(backend, dtype):
    """inf · 0 inside a routing matmul is a real invalid operation: NumPy's warning stays."""
    numpy_backed(backend)
    x = backend.asarray(np.array([[1.0, 2.0], [3.0, 4.0]]), dtype=dtype)
    weight = backend.asarray(np.array([[np.inf, 1.0], [1.0, 1.0]]), dtype=dtype)
    # sigma'(inf) = 0, so expert 0's logit gradient is 0 and meets the inf in grad_logits @ weight
    with pytest.warns(RuntimeWarning, match="invalid value encountered in matmul"):
        grads = route_sigmoid_vjp(backend.asarray(np.ones((2, 2)), dtype=dtype), x, weight)
    assert np.isnan(to_numpy(grads["x"])[:, 0]).all()
    assert np.isfinite(to_numpy(grads["x"])[:, 1]).all()
    with np.errstate(invalid="raise"), pytest.raises(FloatingPointError):
        route_sigmoid_vjp(backend.asarray(np.ones((2, 2)), dtype=dtype), x, weight)


def test_matmul_helper_reports_exactly_the_products_own_invalid_and_overflow():
    from condconv_ref._matmul import matmul

    xp = array_api_compat.array_namespace(np.ones(1))
    big = np.array([[3e38, 3e38]], dtype=np.float32)
    with pytest.warns(RuntimeWarning, match="overflow encountered in matmul"):
        assert np.isinf(matmul(big, np.full((2, 1), 2.0, dtype=np.float32), xp=xp)).all()
    with pytest.warns(RuntimeWarning, match="invalid value encountered in matmul"):
        matmul(np.array([[np.inf, 0.0]]), np.array([[0.0], [1.0]]), xp=xp)
    with no_warnings():   # NaN and inf inputs propagate without a flag, as in a @ b
        out = matmul(np.array([[np.nan, 1.0], [np.inf, 1.0], [1.0, 2.0]]),
                     np.array([[1.0, 0.5], [1.0, 0.5]]), xp=xp)
    np.testing.assert_array_equal(out, [[np.nan, np.nan], [np.inf, np.inf], [3.0, 1.5]])


# ---------------------------------------------------------------- precision policy


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_results_have_the_dtype_namespace_and_device_of_the_inputs(backend, variant, dtype):
    xp_dtype = dtype_on(backend, dtype)
    case = case_of(variant)
    results = {**as_dict(run(case, backend, dtype, vjp=False)),
               **as_dict(run(case, backend, dtype, vjp=True,
                             cotangent=cotangent_for(case, backend, dtype)))}
    reference = backend.asarray(np.zeros(1))
    for name, result in results.items():
        assert result.dtype == xp_dtype, f"{variant} {name}: dtype {result.dtype}"
        assert type(result) is type(reference), f"{variant} {name}: {type(result)}"
        assert array_api_compat.device(result) == array_api_compat.device(reference)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float16_is_computed_in_float32_and_rounded_once(backend, variant):
    xp = backend.xp
    float16 = dtype_on(backend, "float16")
    case = case_of(variant)
    cotangent = cotangent_for(case, backend, "float16")
    half = case.arrays_on(backend, "float16")
    widened = {name: xp.astype(a, xp.float32) for name, a in half.items()}
    for vjp in (False, True):
        results = as_dict(run(case, backend, vjp=vjp, arrays=half, cotangent=cotangent))
        in_float32 = as_dict(run(case, backend, vjp=vjp, arrays=widened,
                                 cotangent=xp.astype(cotangent, xp.float32)))
        for name, result in results.items():
            assert result.dtype == float16
            expected = to_numpy(xp.astype(in_float32[name], float16))
            assert np.array_equal(to_numpy(result), expected, equal_nan=True), (
                f"{variant}{'_vjp' if vjp else ''} {name}: not the float32 result rounded once")


def test_float16_sums_keep_what_float16_accumulation_would_lose(backend):
    """1024 + 1024 terms of 0.25: each term is below half an ulp of 1024 in float16, so a
    float16 accumulator stays at 1024; accumulating in float32 gives 1280 exactly."""
    dtype_on(backend, "float16")
    values = np.concatenate([[1024.0], np.full(1024, 0.25)]).reshape(1, 1, -1)
    x = backend.asarray(values, "float16")
    kernel = backend.asarray(np.ones((1, 1, 1025)), "float16")
    routing = backend.asarray(np.ones((1, 1)), "float16")
    experts = backend.asarray(np.ones((1, 1, 1, 1025)), "float16")
    for result in (conv(x, kernel), condconv(x, experts, routing),
                   depthwise_condconv(x, experts, routing)):
        assert float(to_numpy(result)[0, 0, 0]) == 1280.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_mixed_with_float64_is_rejected_by_every_op(backend, variant):
    case = case_of(variant)
    arrays = case.arrays_on(backend, "float64")
    cotangent = cotangent_for(case, backend)
    for name in list(arrays) + ["cotangent"]:
        mixed = {**arrays}
        mixed_cotangent = cotangent
        if name == "cotangent":
            mixed_cotangent = backend.xp.astype(cotangent, backend.xp.float32)
        else:
            mixed[name] = backend.xp.astype(arrays[name], backend.xp.float32)
        for vjp in (False, True) if name != "cotangent" else (True,):
            function = variant + ("_vjp" if vjp else "")
            with pytest.raises(TypeError, match=rf"^{function}: .*float32.*float64|"
                                                rf"^{function}: .*float64.*float32"):
                run(case, backend, vjp=vjp, arrays=mixed, cotangent=mixed_cotangent)


# ---------------------------------------------------------------- NaN and inf


def source_indices(size: int, before: int, after: int, mode: str) -> np.ndarray:
    """Input index of each padded position (-1 for zeros), from ``numpy.pad``'s own modes."""
    if mode == "zeros":
        return np.pad(np.arange(size), (before, after), constant_values=-1)
    return np.pad(np.arange(size), (before, after),
                  mode={"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode])


def reads(config: ConvConfig, axis: int) -> np.ndarray:
    """Boolean (out, n) along ``axis``: which input positions each output position reads."""
    (before, after), size = config.padding_pairs[axis], config.spatial[axis]
    source = source_indices(size, before, after, config.padding_mode)
    stride, dilation, k = config.stride[axis], config.dilation[axis], config.kernel[axis]
    matrix = np.zeros((config.output_shape[2 + axis], size), dtype=bool)
    for p in range(matrix.shape[0]):
        taps = source[stride * p + dilation * np.arange(k)]
        matrix[p, taps[taps >= 0]] = True
    return matrix


def same_group(config: ConvConfig) -> np.ndarray:
    """Boolean (O, C): output channel o reads input channel c."""
    out_group = np.arange(config.out_channels) // (config.out_channels // config.groups)
    in_group = np.arange(config.in_channels) // (config.in_channels // config.groups)
    return out_group[:, None] == in_group[None, :]


def receptive_mask(config: ConvConfig, pixel: tuple[int, ...]) -> np.ndarray:
    """Boolean (B, O, *out): the outputs whose receptive field holds input ``(b, c, *p)``."""
    b, c, *where = pixel
    mask = np.zeros(config.output_shape, dtype=bool)
    spatial = np.ones((), dtype=bool)
    for axis, position in enumerate(where):
        spatial = np.multiply.outer(spatial, reads(config, axis)[:, position])
    mask[b] = np.multiply.outer(same_group(config)[:, c], spatial)
    return mask


def read_by(config: ConvConfig, position: tuple[int, ...]) -> np.ndarray:
    """Boolean (B, C, *spatial): the inputs in the receptive field of output ``(b, o, *p)``."""
    b, o, *where = position
    mask = np.zeros(config.x_shape, dtype=bool)
    spatial = np.ones((), dtype=bool)
    for axis, p in enumerate(where):
        spatial = np.multiply.outer(spatial, reads(config, axis)[p, :])
    mask[b] = np.multiply.outer(same_group(config)[o, :], spatial)
    return mask


# inf - inf is NaN, and NumPy says so: "invalid value encountered".
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("variant", ["conv", "condconv", "depthwise_condconv", "moe_condconv"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@given(data=st.data())
def test_nan_or_inf_in_one_pixel_reaches_exactly_the_outputs_that_read_it(backend, variant,
                                                                          value, data):
    depthwise = VARIANTS[variant].depthwise
    config = data.draw(conv_configs(spatial_dims=(1, 2), depthwise=depthwise), label="config")
    case = build_case(variant, config, seed=0)
    pixel = tuple(data.draw(st.integers(0, n - 1)) for n in config.x_shape)
    x = to_numpy(case.x).copy()
    x[pixel] = value
    clean = to_numpy(run(case, backend, vjp=False))
    y = to_numpy(run(case, backend, vjp=False,
                     arrays={**case.arrays_on(backend), "x": backend.asarray(x)}))
    affected = receptive_mask(config, pixel)
    assert (~np.isfinite(y[affected])).all(), "a non-finite input was healed"
    assert_close(y[~affected], clean[~affected], name="outputs that do not read the pixel")


@given(config=conv_configs(spatial_dims=(1, 2)), data=st.data())
def test_nan_in_the_cotangent_reaches_exactly_the_inputs_and_kernel_rows_it_reads(
        backend, config, data):
    case = build_case("conv", config, seed=0)
    position = tuple(data.draw(st.integers(0, n - 1)) for n in config.output_shape)
    cotangent = np.random.default_rng(1).standard_normal(config.output_shape)
    cotangent[position] = math.nan
    arrays = case.arrays_on(backend)
    with no_warnings():
        grads = {k: to_numpy(g) for k, g in
                 conv_vjp(backend.asarray(cotangent), **arrays, **case.options).items()}
    o = position[1]
    assert np.array_equal(np.isnan(grads["x"]), read_by(config, position))
    expected_kernel = np.zeros(grads["kernel"].shape, dtype=bool)
    expected_kernel[o] = True
    assert np.array_equal(np.isnan(grads["kernel"]), expected_kernel)
    if "bias" in grads:
        assert np.array_equal(np.isnan(grads["bias"]), np.arange(config.out_channels) == o)


def reads_through(config: ConvConfig, axis: int, tap: int) -> np.ndarray:
    """Boolean (n,) along ``axis``: the input positions some output reads through kernel ``tap``."""
    (before, after), size = config.padding_pairs[axis], config.spatial[axis]
    source = source_indices(size, before, after, config.padding_mode)
    padded = config.stride[axis] * np.arange(config.output_shape[2 + axis]) \
        + config.dilation[axis] * tap
    mask = np.zeros(size, dtype=bool)
    mask[source[padded][source[padded] >= 0]] = True
    return mask


def tap_mask(config: ConvConfig, taps: tuple[int, ...]) -> np.ndarray:
    """Boolean (*spatial): the input positions some output reads through kernel offset ``taps``."""
    mask = np.ones((), dtype=bool)
    for axis, tap in enumerate(taps):
        mask = np.multiply.outer(mask, reads_through(config, axis, tap))
    return mask


# 0 · inf and inf - inf are NaN, and NumPy says so.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@given(config=conv_configs(spatial_dims=(1, 2)), data=st.data())
def test_non_finite_input_spoils_exactly_the_kernel_taps_that_read_it(backend, value, config,
                                                                      data):
    """x̄ does not depend on x: it stays as it was.  W̄[o, c', κ] sums ȳ · x over the outputs
    that read x through offset κ, so exactly the taps κ that read the pixel go non-finite,
    in the pixel's channel and group (the VJP's gaps must not add any other)."""
    case = build_case("conv", config, seed=0)
    pixel = tuple(data.draw(st.integers(0, n - 1), label=f"index {axis}")
                  for axis, n in enumerate(config.x_shape))
    arrays = case.arrays_on(backend)
    x = to_numpy(arrays["x"]).copy()
    x[pixel] = value
    cotangent = backend.asarray(np.random.default_rng(1).standard_normal(config.output_shape))
    clean = {k: to_numpy(g) for k, g in conv_vjp(cotangent, **arrays, **case.options).items()}
    grads = {k: to_numpy(g) for k, g in conv_vjp(cotangent, **{**arrays, "x": backend.asarray(x)},
                                                 **case.options).items()}
    assert_close(grads["x"], clean["x"], name="x gradient")
    c = pixel[1]
    expected = np.zeros(grads["kernel"].shape, dtype=bool)
    for taps in np.ndindex(*config.kernel):
        expected[(same_group(config)[:, c], c % (config.in_channels // config.groups)) + taps] = \
            tap_mask(config, taps)[tuple(pixel[2:])]
    assert np.array_equal(~np.isfinite(grads["kernel"]), expected)
    assert_close(grads["kernel"][~expected], clean["kernel"][~expected], name="other taps")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@given(config=conv_configs(spatial_dims=(1, 2)), data=st.data())
def test_non_finite_kernel_tap_spoils_exactly_the_inputs_it_reads(backend, value, config, data):
    """W̄ does not depend on W: it stays as it was.  x̄ at input (b, c, i) sums W · ȳ over
    the outputs and offsets that read it, so a non-finite W[o, c', κ] spoils exactly the
    positions read through κ, in every example, in input channel c' of o's group."""
    case = build_case("conv", config, seed=0)
    arrays = case.arrays_on(backend)
    kernel = to_numpy(arrays["kernel"]).copy()
    entry = tuple(data.draw(st.integers(0, n - 1), label=f"index {axis}")
                  for axis, n in enumerate(kernel.shape))
    kernel[entry] = value
    cotangent = backend.asarray(np.random.default_rng(1).standard_normal(config.output_shape))
    clean = {k: to_numpy(g) for k, g in conv_vjp(cotangent, **arrays, **case.options).items()}
    grads = {k: to_numpy(g) for k, g in conv_vjp(
        cotangent, **{**arrays, "kernel": backend.asarray(kernel)}, **case.options).items()}
    assert_close(grads["kernel"], clean["kernel"], name="kernel gradient")
    o, c_in, *taps = entry
    per_group = config.in_channels // config.groups
    channel = o // (config.out_channels // config.groups) * per_group + c_in
    expected = np.zeros(grads["x"].shape, dtype=bool)
    expected[:, channel] = tap_mask(config, tuple(taps))
    assert np.array_equal(~np.isfinite(grads["x"]), expected)
    assert_close(grads["x"][~expected], clean["x"][~expected], name="other inputs")


def _example_spoiled(result: np.ndarray, clean: np.ndarray, b: int, name: str) -> None:
    assert np.isnan(result[b]).all(), f"{name}: example {b} is not entirely NaN"
    others = np.arange(result.shape[0]) != b
    assert np.isfinite(result[others]).all(), f"{name}: NaN spread to other examples"
    np.testing.assert_allclose(result[others], clean[others], rtol=1e-12, atol=1e-12,
                               err_msg=f"{name}: other examples changed")


@pytest.mark.parametrize("variant", ["condconv", "moe_condconv", "depthwise_condconv",
                                     "cond_linear", "moe_cond_linear", "mix_experts"])
def test_nan_in_one_routing_weight_spoils_exactly_its_example(backend, variant):
    case = case_of(variant)
    routing = to_numpy(case.arrays["routing"]).copy()
    routing[1, 0] = math.nan
    clean = to_numpy(run(case, backend, vjp=False))
    with no_warnings():
        y = to_numpy(run(case, backend, vjp=False, arrays={
            **case.arrays_on(backend), "routing": backend.asarray(routing)}))
    _example_spoiled(y, clean, 1, variant)


@pytest.mark.parametrize("variant", ["route_sigmoid", "route_softmax", "condconv_layer",
                                     "depthwise_condconv_layer", "cond_linear_layer",
                                     "dynamic_conv_layer"])
def test_nan_in_one_pixel_spoils_its_whole_example_through_the_routing(backend, variant):
    """Global average pooling reads every pixel: a layer's routing, and so its whole output
    for that example, is NaN; the other examples are untouched."""
    case = case_of(variant)
    x = to_numpy(case.x).copy()
    x[(2,) + (0,) * (x.ndim - 1)] = math.nan
    clean = to_numpy(run(case, backend, vjp=False))
    with no_warnings():
        y = to_numpy(run(case, backend, vjp=False,
                         arrays={**case.arrays_on(backend), "x": backend.asarray(x)}))
    _example_spoiled(y, clean, 2, variant)


# ---------------------------------------------------------------- the batch


def along_batch(arrays: dict, pick) -> dict:
    return {name: pick(a) if name in BATCHED else a for name, a in arrays.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_permuting_the_batch_permutes_the_results(backend, variant):
    case = case_of(variant)
    order = [2, 0, 3, 1]
    xp = backend.xp

    def permute(a):
        return xp.take(a, backend.asarray(np.array(order)), axis=0)

    arrays, cotangent = case.arrays_on(backend), cotangent_for(case, backend)
    permuted = along_batch(arrays, permute)
    y = run(case, backend, vjp=False, arrays=arrays)
    exact = {"rtol": 0, "atol": 0} if backend.name != "torch" and variant == "conv" else {}
    assert_close(run(case, backend, vjp=False, arrays=permuted), permute(y), **exact,
                 name=f"{variant} output")
    grads = run(case, backend, vjp=True, arrays=arrays, cotangent=cotangent)
    permuted_grads = run(case, backend, vjp=True, arrays=permuted, cotangent=permute(cotangent))
    for name, grad in grads.items():
        if name in BATCHED:
            assert_close(permuted_grads[name], permute(grad), name=f"{variant}_vjp {name}")
        else:  # summed over the batch, in another order
            assert_close(permuted_grads[name], grad, name=f"{variant}_vjp {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_splitting_the_batch_in_two_gives_the_same_results(backend, variant):
    case = case_of(variant)
    if case.options.get("batch_norm") == "train":  # batch statistics couple the examples:
        width = case.arrays["fc_weight"].shape[0]  # the property is for running statistics
        case = replace(case, options={**case.options, "batch_norm": "eval"},
                       arrays={**case.arrays, "bn_running_mean": np.zeros(width),
                               "bn_running_var": np.ones(width)})
    xp = backend.xp
    arrays, cotangent = case.arrays_on(backend), cotangent_for(case, backend)
    halves = [along_batch(arrays, lambda a: a[:2, ...]), along_batch(arrays, lambda a: a[2:, ...])]
    y = run(case, backend, vjp=False, arrays=arrays)
    exact = {"rtol": 0, "atol": 0} if backend.name != "torch" and variant == "conv" else {}
    joined = xp.concat([run(case, backend, vjp=False, arrays=half) for half in halves])
    assert_close(joined, y, **exact,
                 name=f"{variant} output of two halves")
    grads = run(case, backend, vjp=True, arrays=arrays, cotangent=cotangent)
    half_grads = [run(case, backend, vjp=True, arrays=half, cotangent=part)
                  for half, part in zip(halves, (cotangent[:2, ...], cotangent[2:, ...]))]
    for name, grad in grads.items():
        if name in BATCHED:
            assert_close(xp.concat([g[name] for g in half_grads]), grad,
                         name=f"{variant}_vjp {name} of two halves")
        else:
            assert_close(half_grads[0][name] + half_grads[1][name], grad,
                         name=f"{variant}_vjp {name}: sum over the halves")
