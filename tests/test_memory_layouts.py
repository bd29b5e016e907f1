"""Odd memory layouts give the results of contiguous inputs, and inputs are never written to.

Public layers have broken on channels-last views and on non-contiguous tensors
fed to ``view``.  Every op and VJP here gets all of its arrays (the cotangent
included) in one layout at a time: a channels-last view, transposed storage,
a strided view into a larger buffer, negative strides (NumPy only: torch has
none) and read-only NumPy arrays.  The values are those of the contiguous
arrays, so the results must equal the contiguous results up to the rounding of a
different summation order (BLAS takes other paths for other strides); the
inputs are compared with copies taken before the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from condconv_ref.backends import to_numpy
from condconv_ref.testing import ConvConfig, assert_close
from condconv_ref.variants import VARIANTS, bind, build_case

CONFIG = ConvConfig(batch=3, in_channels=4, out_channels=6, groups=2, spatial=(7, 6),
                    kernel=(3, 2), stride=(2, 1), dilation=(1, 2), padding=1,
                    padding_mode="replicate", n_experts=3, bias=True)


def _channels_last(a: np.ndarray) -> np.ndarray:
    """The same values, stored with the channel axis (axis 1) last."""
    if a.ndim < 3:
        return np.asfortranarray(a)
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def _strided(a: np.ndarray) -> np.ndarray:
    """Every other element of a buffer twice as long along the last axis."""
    buffer = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    buffer[..., ::2] = a
    return buffer[..., ::2]


def _read_only(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


NUMPY_LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "channels-last view": _channels_last,
    "transposed storage": lambda a: np.asfortranarray(a),
    "strided view": _strided,
    "negative strides": lambda a: np.ascontiguousarray(a[..., ::-1])[..., ::-1],
    "read-only": _read_only,
}


def _torch_layouts() -> dict[str, Callable[[np.ndarray], Any]]:
    torch = pytest.importorskip("torch")

    def channels_last(a):
        t = torch.from_numpy(a.copy())
        if t.ndim < 3:
            return transposed(a)
        return t.movedim(1, -1).contiguous().movedim(-1, 1)

    def transposed(a):
        t = torch.from_numpy(a.copy())
        return t.permute(*reversed(range(t.ndim))).contiguous().permute(*reversed(range(t.ndim)))

    return {"channels-last view": channels_last, "transposed storage": transposed,
            "strided view": lambda a: torch.from_numpy(_strided(a))}


def layouts(backend) -> dict[str, Callable[[np.ndarray], Any]]:
    if backend.name == "numpy":
        return NUMPY_LAYOUTS
    if backend.name == "torch":
        return _torch_layouts()
    pytest.skip(f"{backend.name} arrays do not expose their strides")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_odd_layouts_give_the_contiguous_results_and_stay_unwritten(backend, variant):
    config = CONFIG
    if VARIANTS[variant].depthwise:
        config = replace(config, groups=config.in_channels, out_channels=2 * config.in_channels)
    case = build_case(variant, config, seed=5, temperature=0.8)
    entry = VARIANTS[variant]
    forward, vjp = bind(entry.forward, case), bind(entry.vjp, case, vjp=True)
    contiguous = {name: np.ascontiguousarray(a) for name, a in case.arrays.items()}
    y = forward(**{name: backend.asarray(a) for name, a in contiguous.items()})
    cotangent = np.random.default_rng(2).standard_normal(to_numpy(y).shape)
    grads = vjp(backend.asarray(cotangent),
                **{name: backend.asarray(a) for name, a in contiguous.items()})
    for layout, arrange in layouts(backend).items():
        arrays = {name: arrange(a) for name, a in contiguous.items()}
        odd_cotangent = arrange(cotangent)
        if layout != "read-only":
            assert not all(_is_contiguous(a) for a in arrays.values()), layout
        assert_close(forward(**arrays), y, reduction_length=case.lengths[0],
                     name=f"{variant} with {layout}")
        odd_grads = vjp(odd_cotangent, **arrays)
        for name, grad in grads.items():
            assert_close(odd_grads[name], grad, reduction_length=case.lengths[1],
                         name=f"{variant}_vjp {name} with {layout}")
        for name, a in arrays.items():
            assert np.array_equal(to_numpy(a), contiguous[name]), f"{layout}: {name} was written"
        assert np.array_equal(to_numpy(odd_cotangent), cotangent), f"{layout}: cotangent written"


def _is_contiguous(a: Any) -> bool:
    if isinstance(a, np.ndarray):
        return a.flags.c_contiguous
    return a.is_contiguous()
