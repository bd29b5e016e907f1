"""What the derivative tests share: the small cases they draw, the dtypes, one fixed
configuration, and a way to take the router's own second-order term out of a layer's HVP."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from hypothesis import strategies as st

from condconv_ref.testing import ConvConfig
from condconv_ref.testing.strategies import Supports
from condconv_ref.variants import VARIANTS

SMALL = Supports(spatial_dims=(1, 2), max_batch=2, max_experts=3, max_groups=2,
                 max_channels_per_group=2, max_out_per_group=2, max_size=5)
DTYPES = st.sampled_from(["float64", "float32"])
CONFIG = ConvConfig(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5,),
                    kernel=(3,), stride=(1,), dilation=(1,), padding=1, padding_mode="zeros",
                    n_experts=3, bias=True)


def _without_the_routers_term(router):
    """``router`` with its own second-order term replaced by zeros."""
    def zero(*args, **kwargs):
        return {name: 0 * term for name, term in router.route_hvp(*args, **kwargs).items()}
    return router._replace(route_hvp=zero)


@contextmanager
def routers_without_second_order(variant, monkeypatch):
    """Inside the block, the HVP of the sigmoid- or softmax-routed layer ``variant`` lacks
    its router's own second-order term."""
    module = sys.modules[VARIANTS[variant].hvp.__module__]
    with monkeypatch.context() as patch:
        if variant == "dynamic_conv_layer":
            router = module._softmax_router
            patch.setattr(module, "_softmax_router",
                          lambda temperature: _without_the_routers_term(router(temperature)))
        else:
            patch.setattr(module, "SIGMOID", _without_the_routers_term(module.SIGMOID))
        yield
