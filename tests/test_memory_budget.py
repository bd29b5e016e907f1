"""The working-memory budget: calls fit in it by working in smaller windows, or fail early.

:mod:`condconv_ref.memory` promises that every public op estimates its working
memory before allocating, that convolutions shrink their im2col windows to fit
the budget, and that a call that cannot fit raises :class:`MemoryBudgetError`
naming the function and the estimate, before any large allocation: an absurd
call fails in milliseconds instead of exhausting the machine.

Allocations are measured with :mod:`tracemalloc`, which sees NumPy's (and so
array-api-strict's) arrays; for torch only the errors are checked.
"""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

import condconv_ref
from condconv_ref import (
    MemoryBudgetError,
    conv,
    depthwise_condconv,
    depthwise_condconv_vjp,
    get_memory_budget,
    memory_budget,
    mix_experts,
    set_memory_budget,
)
from condconv_ref.testing import ConvConfig, assert_close
from condconv_ref.variants import VARIANTS, bind, build_case

CONFIG = ConvConfig(batch=4, in_channels=4, out_channels=4, groups=1, spatial=(24, 24),
                    kernel=(5, 5), stride=(1, 1), dilation=(1, 1), padding=2,
                    padding_mode="reflect", n_experts=3, bias=True)
BUDGET = 2**19  # the whole-batch columns alone would take 900 KiB


def traced(backend) -> bool:
    return backend.name.split(":")[0] in ("numpy", "array_api_strict")


def peak_bytes(function):
    """The traced peak of what one call allocates, and its result."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = function()
        return tracemalloc.get_traced_memory()[1] - base, result
    finally:
        tracemalloc.stop()


MODES = ("forward", "vjp", "jvp", "hvp")


def call(variant: str, backend, *, vjp: bool = False, config: ConvConfig = CONFIG,
         mode: str | None = None):
    """A function running ``variant`` on float32 arrays on ``backend``: its forward, or its
    VJP (``vjp``), or the derivative ``mode`` of :data:`MODES` (None where the variant has no
    Hessian-vector product)."""
    mode = mode or ("vjp" if vjp else "forward")
    if VARIANTS[variant].depthwise:
        config = replace(config, groups=config.in_channels, out_channels=2 * config.in_channels)
    case = build_case(variant, config, seed=0)
    entry = VARIANTS[variant]
    arrays = case.arrays_on(backend, "float32")
    if mode == "forward":
        return lambda: bind(entry.forward, case)(**arrays)
    tangents = {name: backend.asarray(t) for name, t in case.tangents("float32").items()}
    if mode == "jvp":
        return lambda: bind(entry.jvp, case, vjp=True)(tangents, **arrays)
    with memory_budget(None):
        output = bind(entry.forward, case)(**arrays)
    cotangent = backend.asarray(np.ones(output.shape), "float32")
    if mode == "vjp":
        return lambda: bind(entry.vjp, case, vjp=True)(cotangent, **arrays)
    if entry.hvp is None:
        return None
    x = arrays.pop("x")
    return lambda: entry.hvp(cotangent, tangents, x, arrays, **case.options)


@pytest.mark.parametrize("variant", ["conv", "condconv", "dynamic_conv_layer",
                                     "depthwise_condconv"])
@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "vjp"])
def test_a_small_budget_gives_the_same_results_within_the_budget(backend, variant, vjp):
    run = call(variant, backend, vjp=vjp)
    with memory_budget(None):
        unlimited = run()
    with memory_budget(BUDGET):
        run()  # first calls allocate one-off caches
        peak, limited = peak_bytes(run)
    for name, result in (limited.items() if vjp else [("output", limited)]):
        reference = unlimited[name] if vjp else unlimited
        assert_close(result, reference, reduction_length=4 * 25 * 24 * 24,
                     name=f"{variant}{'_vjp' if vjp else ''} {name} under a 512 KiB budget")
    if traced(backend):
        assert peak <= BUDGET, f"peak {peak / 2**10:.0f} KiB exceeds the 512 KiB budget"


@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "vjp"])
def test_a_call_that_cannot_fit_fails_before_allocating(backend, vjp):
    """The output alone (4 x 4 x 64 x 64 float32) is 256 KiB, 8 times the budget."""
    run = call("condconv", backend, vjp=vjp, config=replace(CONFIG, spatial=(64, 64)))
    function = "condconv" + ("_vjp" if vjp else "")
    pattern = (rf"^{function}: needs about [0-9.]+ [KM]iB of working memory, more than the "
               r"memory budget of 32.0 KiB; largest parts: ")
    with memory_budget(2**15):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            with pytest.raises(MemoryBudgetError, match=pattern):
                run()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    if traced(backend):
        assert peak < 2**16, f"{peak} bytes allocated before refusing"


@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "vjp"])
def test_depthwise_counts_a_row_larger_than_its_chunk_budget(backend, vjp):
    """The depthwise path works one (example, channel) row at a time at least: a single
    128 x 128 channel with k = 5 has 25 x 128 x 132 float32 columns (1.6 MiB), which no
    chunk budget can shrink.  Under a 512 KiB budget the estimate must say so and refuse,
    before allocating, instead of counting only the budget's share of columns."""
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((1, 1, 128, 128)), "float32")
    experts = backend.asarray(rng.standard_normal((2, 1, 1, 5, 5)), "float32")
    routing = backend.asarray(rng.uniform(size=(1, 2)), "float32")
    function = "depthwise_condconv" + ("_vjp" if vjp else "")
    run = (lambda: depthwise_condconv_vjp(backend.asarray(np.ones((1, 1, 128, 128)), "float32"),
                                          x, experts, routing, padding=2)) if vjp else \
        (lambda: depthwise_condconv(x, experts, routing, padding=2))
    with memory_budget(BUDGET):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            with pytest.raises(MemoryBudgetError,
                               match=rf"^{function}: .*columns of one chunk of rows"):
                run()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    if traced(backend):
        assert peak < BUDGET, f"{peak} bytes allocated before refusing"
    with memory_budget(4 * 2**20):
        run()  # and it runs once the budget holds a row


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_op_and_derivative_checks_its_working_memory(backend, variant):
    config = replace(CONFIG, batch=2, in_channels=2, out_channels=2, spatial=(5,), kernel=(3,),
                     stride=(1,), dilation=(1,), padding=1)
    for mode in MODES:
        run = call(variant, backend, config=config, mode=mode)
        if run is None:
            continue
        name = variant if mode == "forward" else f"{variant}_{mode}"
        with memory_budget(1), pytest.raises(MemoryBudgetError, match=rf"^{name}:"):
            run()


def test_absurd_sizes_are_refused_at_once_instead_of_exhausting_memory(backend):
    """With the default budget (half the physical memory), a 10**12-wide padding or a
    10**11-element mixture fails in well under a second."""
    assert get_memory_budget() is not None
    x, kernel = backend.asarray(np.ones((2, 3, 11))), backend.asarray(np.ones((5, 3, 4)))
    routing, experts = backend.asarray(np.ones((10**6, 1))), backend.asarray(np.ones((1, 10**5)))
    start = time.perf_counter()
    with pytest.raises(MemoryBudgetError, match=r"^conv: needs about [0-9.]+ TiB"):
        conv(x, kernel, padding=10**12, padding_mode="replicate")
    with pytest.raises(MemoryBudgetError, match=r"^mix_experts: needs about [0-9.]+ GiB"):
        mix_experts(routing, experts)
    assert time.perf_counter() - start < 1.0


def test_memory_budget_is_restored_after_its_block_even_on_error():
    before = get_memory_budget()
    with pytest.raises(MemoryBudgetError), memory_budget(1):
        assert get_memory_budget() == 1
        conv(np.ones((1, 1, 3)), np.ones((1, 1, 2)))
    assert get_memory_budget() == before
    previous = set_memory_budget(None)
    try:
        assert previous == before and get_memory_budget() is None
        conv(np.ones((1, 1, 3)), np.ones((1, 1, 2)))
    finally:
        set_memory_budget(previous)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_budgets_must_be_positive_ints_or_none(bad):
    error = TypeError if isinstance(bad, (bool, float, str)) else ValueError
    with pytest.raises(error, match=r"^set_memory_budget: nbytes"):
        set_memory_budget(bad)
    with pytest.raises(error, match=r"^memory_budget: nbytes"):
        memory_budget(bad)
    assert condconv_ref.memory_budget is memory_budget


# ---------------------------------------------------------------- measured peaks


def smallest_accepted_budget(run) -> int:
    """The smallest budget under which ``run`` is not refused, by bisection on refusals (each
    refused call allocates nothing, so the search is cheap)."""
    low, high = 1, 2**20
    while True:
        with memory_budget(high):
            try:
                run()
                break
            except MemoryBudgetError:
                low, high = high, 2 * high
    while high - low > max(1, low // 64):
        middle = (low + high) // 2
        with memory_budget(middle):
            try:
                run()
                high = middle
            except MemoryBudgetError:
                low = middle
    return high


def _linear_case(variant, batch, n_experts, out_features, in_features, dtype="float32"):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((batch, in_features)),
              "experts": rng.standard_normal((n_experts, out_features, in_features))}
    if variant == "cond_linear_layer":
        params = {"experts": arrays.pop("experts"),
                  "route_weight": rng.standard_normal((n_experts, in_features))}
        return {"x": arrays["x"].astype(dtype)}, {k: v.astype(dtype) for k, v in params.items()}
    arrays["routing"] = rng.uniform(size=(batch, n_experts))
    return {k: v.astype(dtype) for k, v in arrays.items()}, None


def _measured_call(name, vjp, arrays, params=None, **options):
    """A call of op ``name`` (or its VJP at a cotangent of ones) on NumPy ``arrays``."""
    forward = getattr(condconv_ref, name)
    call_arrays = (arrays["x"], params) if params is not None else tuple(arrays.values())
    if not vjp:
        return lambda: forward(*call_arrays, **options)
    with memory_budget(None):
        output = forward(*call_arrays, **options)
    cotangent = np.ones(output.shape, dtype=output.dtype)
    backward = getattr(condconv_ref, name + "_vjp")
    return lambda: backward(cotangent, *call_arrays, **options)


def _routing_arrays(batch, channels, experts, hidden, spatial=4):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, spatial)).astype("float32")
    return x, rng.standard_normal((hidden, channels)).astype("float32"), \
        rng.standard_normal((experts, hidden)).astype("float32")


OBJECTS = 2**14  # Python objects and array headers, which the budget (of large arrays) omits

# Shapes where one term of an estimate dominates; each must peak within twice the smallest
# budget its op accepts.
MEASURED = {
    # float16 inputs are widened to float32 copies before the op runs: here they are all
    # there is (a stride of 4096 leaves one output per example and channel)
    "conv float16": lambda vjp: _measured_call(
        "conv", vjp, {"x": np.ones((4, 8, 4096), np.float16),
                      "kernel": np.ones((8, 8, 1), np.float16)}, stride=4096),
    # the shared-matmul form's (E, B, F_in) and (E, B, F_out) temporaries (E <= F_in)
    "cond_linear shared": lambda vjp: _measured_call(
        "cond_linear", vjp, *_linear_case("cond_linear", 64, 16, 8, 256)),
    # the mixed-weight form's (B, F_out, F_in) weights (E > F_in)
    "cond_linear mixed": lambda vjp: _measured_call(
        "cond_linear", vjp, *_linear_case("cond_linear", 16, 64, 32, 32)),
    "moe_cond_linear": lambda vjp: _measured_call(
        "moe_cond_linear", vjp, *_linear_case("moe_cond_linear", 64, 16, 8, 256)),
    "cond_linear_layer": lambda vjp: _measured_call(
        "cond_linear_layer", vjp, *_linear_case("cond_linear_layer", 64, 16, 8, 256)),
    # the routing parameters' gradients (E, C) and (H, C), (E, H) dominate x's
    "route_sigmoid": lambda vjp: _measured_call(
        "route_sigmoid", vjp, {"x": _routing_arrays(2, 512, 256, 1)[0],
                               "weight": np.ones((256, 512), np.float32)}),
    "route_softmax": lambda vjp: _measured_call(
        "route_softmax", vjp, dict(zip(("x", "fc1_weight", "fc2_weight"),
                                       _routing_arrays(2, 512, 256, 256))), temperature=1.0),
    # the routing's x gradient (B, C, *spatial) dominates
    "route_sigmoid x": lambda vjp: _measured_call(
        "route_sigmoid", vjp, {"x": _routing_arrays(8, 16, 4, 1, spatial=4096)[0],
                               "weight": np.ones((4, 16), np.float32)}),
}


@pytest.mark.parametrize("vjp", [False, True], ids=["forward", "vjp"])
@pytest.mark.parametrize("case", MEASURED, ids=MEASURED)
def test_an_accepted_call_peaks_within_twice_its_budget(case, vjp):
    run = MEASURED[case](vjp)
    budget = smallest_accepted_budget(run)
    with memory_budget(budget):
        run()  # one-off caches
        peak, _ = peak_bytes(run)
    assert peak <= 2 * budget + OBJECTS, (f"{case}{' vjp' if vjp else ''}: peak {peak} bytes under an "
                                f"accepted budget of {budget} ({peak / budget:.1f}x)")


@pytest.mark.parametrize(("variant", "mode"), [
    (variant, mode) for variant, entry in VARIANTS.items() for mode in MODES
    if mode != "hvp" or entry.hvp is not None])
def test_every_op_and_derivative_peaks_within_twice_the_budget_it_accepts(variant, mode):
    run = call(variant, get_backend_numpy(), mode=mode,
               config=replace(CONFIG, spatial=(12, 12), kernel=(3, 3), padding=1))
    budget = smallest_accepted_budget(run)
    with memory_budget(budget):
        run()
        peak, _ = peak_bytes(run)
    assert peak <= 2 * budget + OBJECTS, (f"{variant} {mode}: peak {peak} bytes under "
                                          f"an accepted budget of {budget} ({peak / budget:.1f}x)")


def get_backend_numpy():
    from condconv_ref.backends import get_backend

    return get_backend("numpy")
