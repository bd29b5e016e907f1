"""Draw a fixed number of examples from a hypothesis strategy, reproducibly, outside a test.

``condconv-ref verify`` draws its random configurations here from the same
strategies the test suite uses (:mod:`condconv_ref.testing.strategies`), and
golden-vector writers can draw theirs the same way, so one ``seed`` names the
same configurations everywhere (for one hypothesis version).

Importing it does not import hypothesis (:func:`case_seed` does not need it);
:func:`draw_examples` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from condconv_ref._validate import check_positive_int

if TYPE_CHECKING:
    from hypothesis import strategies as st

__all__ = ["case_seed", "draw_examples"]

_MAX_ROUNDS = 100


def _draw_round(strategy: st.SearchStrategy[Any], count: int, seed: int) -> list[Any]:
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed

    drawn: list[Any] = []

    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              derandomize=False, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


def draw_examples(strategy: st.SearchStrategy[Any], count: int, *, seed: int) -> list[Any]:
    """Return ``count`` examples of ``strategy``, the same ones for the same ``seed``.

    Hypothesis generates them as it would for a test run under ``@seed(seed)``
    (generation phase only: no database, no shrinking), so they include its
    simplest example and the edge cases it favours.  Rounds with derived seeds
    are added if a round yields fewer than ``count`` (strategies that filter).

    Parameters
    ----------
    strategy : hypothesis strategy
    count : int
        Number of examples, >= 1.
    seed : int
        Seed of hypothesis's generator.

    Returns
    -------
    list
        ``count`` examples.

    Raises
    ------
    RuntimeError
        If the strategy yields too few examples even after many rounds.

    Examples
    --------
    >>> from hypothesis import strategies as st
    >>> numbers = st.integers(0, 10**6)
    >>> draw_examples(numbers, 3, seed=1) == draw_examples(numbers, 3, seed=1)
    True
    >>> len(draw_examples(st.integers(0, 10**6), 5, seed=2))
    5
    """
    count = check_positive_int("draw_examples", "count", count)
    drawn: list[Any] = []
    for round_index in range(_MAX_ROUNDS):
        drawn += _draw_round(strategy, count - len(drawn), case_seed(seed, round_index))
        if len(drawn) >= count:
            return drawn[:count]
    raise RuntimeError(f"draw_examples: the strategy gave only {len(drawn)} of {count} examples "
                       f"in {_MAX_ROUNDS} rounds")


def case_seed(seed: int, index: int) -> int:
    """A 32-bit seed for item ``index`` of a run seeded ``seed``, independent across items.

    Examples
    --------
    >>> case_seed(0, 1) == case_seed(0, 1), case_seed(0, 1) == case_seed(0, 2)
    (True, False)
    """
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
