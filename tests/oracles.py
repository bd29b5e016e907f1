"""The oracles now live in :mod:`condconv_ref.testing.oracles`; re-exported for old imports.

Import from ``condconv_ref.testing.oracles`` instead; remove this module once no
test does ``from oracles import ...``.
"""

from condconv_ref.testing.oracles import (  # noqa: F401
    NUMPY_PAD_MODES,
    TORCH_PAD_MODES,
    dilate,
    explicit_pairs,
    scipy_conv,
    torch_conv,
)
