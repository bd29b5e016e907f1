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


def call(variant: str, backend, *, vjp: bool = False, config: ConvConfig = CONFIG):
    """A function running ``variant`` (or its VJP) on float32 arrays on ``backend``."""
    if VARIANTS[variant].depthwise:
        config = replace(config, groups=config.in_channels, out_channels=2 * config.in_channels)
    case = build_case(variant, config, seed=0)
    entry = VARIANTS[variant]
    arrays = case.arrays_on(backend, "float32")
    if not vjp:
        return lambda: bind(entry.forward, case)(**arrays)
    with memory_budget(None):
        output = bind(entry.forward, case)(**arrays)
    cotangent = backend.asarray(np.ones(output.shape), "float32")
    return lambda: bind(entry.vjp, case, vjp=True)(cotangent, **arrays)


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
def test_every_op_and_vjp_checks_its_working_memory(backend, variant):
    config = replace(CONFIG, batch=2, in_channels=2, out_channels=2, spatial=(5,), kernel=(3,),
                     stride=(1,), dilation=(1,), padding=1)
    for vjp in (False, True):
        run = call(variant, backend, vjp=vjp, config=config)
        with memory_budget(1), pytest.raises(MemoryBudgetError, match=rf"^{variant}"):
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
