"""Array backends the reference runs on, by name.

The ops themselves never need this module: they take their namespace from
their inputs.  It serves the callers that must *create* arrays for a chosen
backend: the ``condconv-ref`` command, the test suite's backend fixture, the
golden-vector verifier and the GPU checks.

JAX computes in float32 unless its 64-bit mode is on, and turns a float64
request into float32 without an error.  :func:`require_x64` is the one place
that refuses a 64-bit dtype on JAX while that mode is off; the ``jax``
backend calls it for every array and dtype it makes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["BACKEND_NAMES", "Backend", "BackendUnavailable", "get_backend", "require_x64",
           "to_numpy"]

BACKEND_NAMES = ("numpy", "array_api_strict", "torch", "jax", "cupy")


class BackendUnavailable(RuntimeError):
    """The backend cannot be used here (not installed, or no GPU); the message is one line.

    Examples
    --------
    As on a machine without CuPy (``sys.modules["cupy"] = None`` makes importing it fail):

    >>> import sys
    >>> from condconv_ref.backends import BackendUnavailable, get_backend
    >>> saved = sys.modules.get("cupy")
    >>> sys.modules["cupy"] = None
    >>> try:  # doctest: +NORMALIZE_WHITESPACE
    ...     get_backend("cupy")
    ... except BackendUnavailable as error:
    ...     print(error)
    ... finally:
    ...     if saved is None:
    ...         del sys.modules["cupy"]
    ...     else:
    ...         sys.modules["cupy"] = saved
    backend 'cupy' is not available: cannot import cupy
    (import of cupy halted; None in sys.modules)
    """


@dataclass(frozen=True)
class Backend:
    """A named array namespace and the device arrays are created on.

    Examples
    --------
    >>> from condconv_ref.backends import get_backend
    >>> backend = get_backend("array_api_strict:device1")
    >>> a = backend.asarray([1.0, 2.0], dtype="float32")
    >>> backend.name, a.device, a.dtype == backend.dtype("float32")
    ('array_api_strict:device1', array_api_strict.Device('device1'), True)
    """

    name: str
    xp: ModuleType
    device: Any = None

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        """Copy a NumPy array (or nested sequence) onto this backend, optionally as ``dtype``.

        On JAX, a float64 array (given as one, or asked for) needs JAX's 64-bit mode
        (:func:`require_x64`).
        """
        a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
        if array_api_compat.is_jax_namespace(self.xp):
            require_x64(f"backend {self.name!r}", a.dtype)
        return self.xp.asarray(a, device=self.device, copy=True)

    def dtype(self, name: str) -> Any:
        """The backend's dtype object for a name such as ``"float64"``.

        On JAX, ``"float64"`` needs JAX's 64-bit mode (:func:`require_x64`).
        """
        if array_api_compat.is_jax_namespace(self.xp):
            require_x64(f"backend {self.name!r}", name)
        return getattr(self.xp, name)


def require_x64(fn: str, dtype: Any) -> None:
    """Raise ``ValueError`` if JAX would not keep ``dtype``: a 64-bit dtype while JAX's 64-bit
    mode (``jax_enable_x64``) is off.

    JAX then makes such arrays in the 32-bit dtype instead, with a warning at
    most, so a float64 check would silently run in float32.  Call it wherever
    a JAX array of ``dtype`` is about to be made; it does nothing for dtypes
    JAX keeps as asked, and when JAX is not installed.

    Parameters
    ----------
    fn : str
        The function (or backend) to name in the message.
    dtype : str, dtype or type
        The dtype asked for: a name (``"float64"``), a NumPy dtype or a JAX
        scalar type (``jax.numpy.float64``).

    Raises
    ------
    ValueError
        For a 64-bit dtype while the 64-bit mode is off; the message says how
        to turn it on.

    Examples
    --------
    >>> import jax
    >>> from condconv_ref.backends import require_x64
    >>> require_x64("my_check", "float32")  # JAX keeps float32 in either mode
    >>> enabled = jax.config.jax_enable_x64
    >>> jax.config.update("jax_enable_x64", False)
    >>> try:  # doctest: +NORMALIZE_WHITESPACE
    ...     require_x64("my_check", "float64")
    ... finally:
    ...     jax.config.update("jax_enable_x64", enabled)
    Traceback (most recent call last):
    ...
    ValueError: my_check: dtype float64 needs JAX's 64-bit mode, which is off (JAX would
    compute in float32 instead); turn it on with jax.config.update("jax_enable_x64", True)
    before making any array, or set the environment variable JAX_ENABLE_X64=1
    """
    try:
        import jax
    except ImportError:  # no JAX, no JAX arrays to protect
        return
    wanted = np.dtype(dtype)
    kept = jax.dtypes.canonicalize_dtype(wanted)
    if kept != wanted:
        raise ValueError(
            f"{fn}: dtype {wanted} needs JAX's 64-bit mode, which is off (JAX would compute in "
            f"{kept} instead); turn it on with jax.config.update(\"jax_enable_x64\", True) "
            "before making any array, or set the environment variable JAX_ENABLE_X64=1")


def to_numpy(a: Any) -> np.ndarray:
    """Copy any supported array (NumPy, CuPy, torch, JAX, array-api-strict) to a NumPy array.

    Examples
    --------
    >>> import array_api_strict
    >>> from condconv_ref.backends import to_numpy
    >>> a = array_api_strict.asarray([1.0, 2.0], device=array_api_strict.Device("device1"))
    >>> to_numpy(a)
    array([1., 2.])
    """
    if isinstance(a, np.ndarray):
        return a
    if array_api_compat.is_cupy_array(a):
        return a.get()
    if array_api_compat.is_torch_array(a):
        a = a.detach().cpu()
        return (a.float() if str(a.dtype) == "torch.bfloat16" else a).numpy()
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(a)):
        import array_api_strict

        a = array_api_strict.asarray(a, device=array_api_strict.Device("CPU_DEVICE"), copy=True)
    return np.asarray(a)


def _import(module: str, why: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {why!r} is not available: cannot import {module} ({exc})") from None


def get_backend(name: str) -> Backend:
    """Return the backend called ``name``.

    ``name`` is one of ``numpy``, ``array_api_strict``, ``array_api_strict:device1``
    (a non-default strict device, to prove device propagation), ``torch`` (CPU,
    through array-api-compat), ``jax`` (``jax.numpy`` on JAX's CPU device;
    float64 needs JAX's 64-bit mode, see :func:`require_x64`) or ``cupy`` (the
    current CUDA device).

    Raises
    ------
    BackendUnavailable
        With a one-line reason, when the backend cannot be used here.
    ValueError
        For an unknown name.

    Examples
    --------
    >>> from condconv_ref.backends import get_backend
    >>> get_backend("numpy").xp.__name__
    'array_api_compat.numpy'
    >>> get_backend("array_api_strict:device1").device
    array_api_strict.Device('device1')
    >>> get_backend("tensorflow")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: get_backend: unknown backend 'tensorflow', expected one of ('numpy', ...)
    """
    base, _, device_name = name.partition(":")
    if base not in BACKEND_NAMES:
        raise ValueError(f"get_backend: unknown backend {name!r}, expected one of {BACKEND_NAMES}")
    if base == "numpy":
        return Backend(name, array_api_compat.array_namespace(np.empty(0)))
    if base == "array_api_strict":
        strict = _import("array_api_strict", name)
        device = strict.Device(device_name) if device_name else None
        return Backend(name, strict, device)
    if base == "torch":
        torch = _import("torch", name)
        return Backend(name, array_api_compat.array_namespace(torch.empty(0)), "cpu")
    if base == "jax":
        jax = _import("jax", name)
        return Backend(name, array_api_compat.array_namespace(jax.numpy.empty(0)),
                       jax.devices("cpu")[0])
    cupy = _import("cupy", name)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken: report, do not crash
        raise BackendUnavailable(f"backend 'cupy' is not available: no usable CUDA device ({exc})") from None
    if count < 1:
        raise BackendUnavailable("backend 'cupy' is not available: no CUDA device found")
    xp = array_api_compat.array_namespace(cupy.empty(0))
    return Backend(name, xp, cupy.cuda.Device())
