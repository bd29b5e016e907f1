"""Speed of the property-test loop: hypothesis examples per second at the S1 size.

One example is what a property test of a user's layer costs: draw a seed, make
S1-sized float64 arrays, run the forward, and check the VJP against central
finite differences with :func:`condconv_ref.testing.check_vjp` (two more
forwards and one VJP).
"""

from __future__ import annotations

import time
from functools import partial

from benchmarks.cases import CASES

__all__ = ["examples_per_second"]


def examples_per_second(examples: int, dtype: str = "float64") -> tuple[float, int]:
    """``(examples per second, examples run)`` of the S1 property loop on NumPy."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from condconv_ref import condconv, condconv_vjp
    from condconv_ref.testing import check_vjp

    case = CASES["S1"]
    forward = partial(condconv, **case.options)
    vjp = partial(condconv_vjp, **case.options)
    count = 0

    def example(seed: int) -> None:
        args, cotangent = case.arrays(dtype, seed)
        forward(**args)
        check_vjp(forward, vjp, args, cotangent=cotangent, name="condconv")

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**32 - 1))
    def loop(seed: int) -> None:
        nonlocal count
        example(seed)
        count += 1

    example(0)  # warm-up: first calls pay for imports and caches
    start = time.perf_counter()
    loop()
    return count / (time.perf_counter() - start), count
