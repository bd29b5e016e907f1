"""Force the convolution engine's form, so that tests reach every form at every size.

The engine (:mod:`condconv_ref._conv_engine`) picks the gather form for small
convolutions, the flat form for depthwise ones and im2col otherwise; test
cases are small, so without this they would reach the gather form only.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import pytest

engine = importlib.import_module("condconv_ref._conv_engine")

FORMS = ("gather", "flat", "im2col")


def applies(form: str, kernel_shape: tuple[int, ...], nd: int) -> bool:
    """Whether ``form`` can compute a convolution with this kernel: flat needs C/groups = 1."""
    return form != "flat" or kernel_shape[-nd - 1] == 1


@contextlib.contextmanager
def engine_form(form: str) -> Iterator[None]:
    """Inside the block, every convolution takes ``form`` where it applies (else the usual one)."""
    natural = engine.conv_form

    def forced(x_shape, kernel_shape, geometry, itemsize):
        if applies(form, kernel_shape, len(geometry.out)):
            return form
        return natural(x_shape, kernel_shape, geometry, itemsize)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "conv_form", forced)
        yield
