"""The working-memory budget of the public ops.

Before it allocates anything, every public op estimates from its arguments'
shapes the *working memory* it needs: its results and its largest temporaries
(a padded copy of the input, per-example kernels, expert outputs, the im2col
columns of a convolution), not its inputs.  If the estimate exceeds the budget
it raises :class:`MemoryBudgetError`, a :class:`MemoryError` whose message
names the function, the estimate and its largest parts, instead of starting
work that would exhaust the machine.

Convolutions do not need the columns of the whole batch at once: they build
them in windows (groups of examples, or output rows of one example) of at most
a quarter of the budget (and never more than their default size,
``condconv_ref._im2col._WINDOW_BYTES``; small convolutions, computed in one
piece, only while they fit such a window), so a small budget makes them process in more,
smaller windows rather than fail; only what cannot be split (the output, the
padded input, one output row's columns) must fit.

The budget is one process-wide setting: :func:`set_memory_budget`, or the
:func:`memory_budget` context manager around a block.  It starts at half the
machine's physical memory (unlimited where that cannot be read).

It imports nothing from the package but :mod:`condconv_ref._validate`.
"""

from __future__ import annotations

import os
from types import TracebackType

from condconv_ref._validate import check_positive_int, widened_elements

__all__ = [
    "MemoryBudgetError",
    "check_memory",
    "get_memory_budget",
    "memory_budget",
    "set_memory_budget",
    "window_bytes",
]


def _half_the_physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return None


_budget: int | None = _half_the_physical_memory()


class MemoryBudgetError(MemoryError):
    """A call would need more working memory than the budget; raised before allocating.

    Examples
    --------
    A conditional linear layer of 64 examples, 4 experts and 100 features, under a
    budget of 1 KiB:

    >>> import numpy as np
    >>> from condconv_ref import MemoryBudgetError, cond_linear, memory_budget
    >>> x, experts, routing = np.ones((64, 100)), np.ones((4, 100, 100)), np.ones((64, 4))
    >>> with memory_budget(2**10):
    ...     try:
    ...         cond_linear(x, experts, routing)
    ...     except MemoryBudgetError as error:
    ...         print(isinstance(error, MemoryError), str(error).split(",")[0])
    True cond_linear: needs about 250.0 KiB of working memory
    """


def _check_budget(fn: str, nbytes: int | None) -> int | None:
    return None if nbytes is None else check_positive_int(fn, "nbytes", nbytes)


def get_memory_budget() -> int | None:
    """The current working-memory budget in bytes, or ``None`` for no limit.

    Examples
    --------
    >>> from condconv_ref import get_memory_budget, memory_budget
    >>> with memory_budget(None):
    ...     print(get_memory_budget())
    None
    """
    return _budget


def set_memory_budget(nbytes: int | None) -> int | None:
    """Set the working-memory budget of every later call; return the previous one.

    Parameters
    ----------
    nbytes : int or None
        Bytes, >= 1; ``None`` removes the limit.

    Examples
    --------
    >>> import numpy as np
    >>> from condconv_ref import MemoryBudgetError, conv, set_memory_budget
    >>> previous = set_memory_budget(2**10)
    >>> try:
    ...     conv(np.ones((1, 1, 1000)), np.ones((1, 1, 3)))
    ... except MemoryBudgetError as error:
    ...     print(str(error).split(";")[0])
    conv: needs about 31.2 KiB of working memory, more than the memory budget of 1.0 KiB
    >>> _ = set_memory_budget(previous)
    """
    global _budget
    nbytes = _check_budget("set_memory_budget", nbytes)
    previous, _budget = _budget, nbytes
    return previous


class memory_budget:  # noqa: N801 - used like a function: ``with memory_budget(...)``
    """Context manager: the budget is ``nbytes`` inside the block, then restored.

    Examples
    --------
    >>> from condconv_ref import get_memory_budget, memory_budget
    >>> with memory_budget(2**20):
    ...     get_memory_budget()
    1048576
    """

    def __init__(self, nbytes: int | None) -> None:
        self._nbytes = _check_budget("memory_budget", nbytes)
        self._previous: list[int | None] = []

    def __enter__(self) -> memory_budget:
        self._previous.append(set_memory_budget(self._nbytes))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        set_memory_budget(self._previous.pop())


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


# A JVP (``<op>_jvp``) is the product rule: a sum of the forward's computation with one
# argument replaced by its tangent, and an HVP (``<layer>_hvp``) a sum of VJPs likewise.
# Each term needs the working memory of one forward (VJP), and the terms computed are held
# until they are summed, so these calls are estimated at twice their forward's (VJP's)
# working memory; ``tests/test_memory_budget.py`` measures every op's peak against it.
DERIVATIVES = ("_jvp", "_hvp")


def check_memory(fn: str, itemsize: int, parts: dict[str, int]) -> None:
    """Raise :class:`MemoryBudgetError` if ``parts`` exceed the budget.

    ``parts`` maps a description of each large array the call will allocate
    to its number of elements, each ``itemsize`` bytes: for a JVP or an HVP
    (``fn`` ending in one of :data:`DERIVATIVES`), those of one forward or VJP,
    which this doubles.  Inside a float16 call the float32 copies of its inputs
    are added (:func:`condconv_ref._validate.widened_elements`).
    """
    if _budget is None:
        return
    if fn.endswith(DERIVATIVES):
        parts = {**parts, "the product rule's other term": sum(parts.values())}
    if widened_elements():
        parts = {**parts, "float32 copies of the float16 inputs": widened_elements()}
    total = itemsize * sum(parts.values())
    if total <= _budget:
        return
    largest = sorted(parts.items(), key=lambda item: -item[1])[:3]
    listed = ", ".join(f"{name} {_size(itemsize * count)}" for name, count in largest if count)
    raise MemoryBudgetError(
        f"{fn}: needs about {_size(total)} of working memory, more than the memory budget of "
        f"{_size(_budget)}; largest parts: {listed}. Raise the budget with "
        "condconv_ref.set_memory_budget(nbytes) or pass fewer examples per call")


def window_bytes(default: int) -> int:
    """Bytes one window of convolution columns may hold: ``min(default, budget / 4)``."""
    return default if _budget is None else max(1, min(default, _budget // 4))
