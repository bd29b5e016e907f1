"""Turn a PyTorch ``nn.Module`` into the ``forward`` / ``vjp`` / ``jvp`` / ``hvp`` callables the
checker calls.

:func:`torch_implementation` builds the module for each case, loads the case's
arrays into it by name with :func:`torch.func.functional_call` (so nothing is
copied into the module and autograd sees through the layout conversion), and
gets the VJP from autograd, the JVP from forward-mode AD
(:mod:`torch.autograd.forward_ad`, which runs the ``jvp`` rule of a custom
``torch.autograd.Function``) and the HVP from double backward (the gradient
taken with ``create_graph=True`` and differentiated again, which runs the
derivative of every ``backward``, as gradient penalties and meta-learning
do).  torch is imported only when a callable runs.

Examples
--------
A ``condconv_layer`` written the usual PyTorch way, with experts stored
flattened as in timm (E, O·C·k) and ``nn.Linear`` routing:

>>> import torch
>>> import torch.nn.functional as F
>>> from condconv_ref import layouts
>>> from condconv_ref.testing import Supports, check_implementation
>>> class CondConv1d(torch.nn.Module):
...     def __init__(self, channels, out_channels, kernel_size, experts, padding):
...         super().__init__()
...         self.shape, self.padding = (out_channels, channels, kernel_size), padding
...         self.weight = torch.nn.Parameter(torch.zeros(experts, out_channels * channels
...                                                      * kernel_size))
...         self.routing = torch.nn.Linear(channels, experts, bias=False)
...     def forward(self, x):
...         alpha = torch.sigmoid(self.routing(x.mean(dim=2)))
...         kernels = (alpha @ self.weight).reshape(-1, *self.shape[1:])
...         y = F.conv1d(x.reshape(1, -1, x.shape[2]), kernels, padding=self.padding,
...                      groups=x.shape[0])
...         return y.reshape(x.shape[0], self.shape[0], -1)
>>> def build(case):
...     E, O, C, k = case.arrays["experts"].shape
...     return CondConv1d(C, O, k, E, case.options["padding"])
>>> layer = torch_implementation(
...     build, {"experts": ("weight", lambda e, case: layouts.to_torch_flat_experts(e)),
...             "route_weight": "routing.weight"},
...     supports=Supports(spatial_dims=(1,), padding_forms=("int",), padding_modes=("zeros",),
...                       max_groups=1, max_stride=1, max_dilation=1, bias=(False,)))
>>> check_implementation(layer, variant="condconv_layer", max_examples=20).passed
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from condconv_ref._cases import Supports
from condconv_ref.testing.checker import (
    Implementation,
    check_every_array_mapped,
    parameter_mapping,
)
from condconv_ref.variants import Case

__all__ = ["torch_implementation"]

Converter = Callable[[Any, Case], Any]


def _readable(tensor: Any) -> Any:
    """``tensor`` detached, and widened to float32 from bfloat16 (exactly), which NumPy cannot
    read."""
    import torch

    tensor = tensor.detach()
    return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block (unchanged for None)."""
    import torch

    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_every_parameter_set(module: Any, replaced: Mapping[str, Any],
                               mapping: Mapping[str, tuple[str, Converter | None]],
                               case: Case) -> None:
    """Raise when a parameter of ``module`` gets no value from ``case``: it would run with the
    values it was built with (``torch.empty`` garbage, or a random initialisation)."""
    sources = {target: name for name, (target, _) in mapping.items()}
    for target, _ in module.named_parameters():
        if target in replaced:
            continue
        if target in sources:
            reason = (f"it is mapped from {sources[target]!r}, which this case does not have "
                      f"(case arrays: {sorted(case.arrays)}); build the module without "
                      f"{target!r} for such cases, or narrow supports (e.g. "
                      f"Supports(bias=(True,)))")
        else:
            reason = (f"no case array is mapped to it (mapped: "
                      f"{sorted(sources)}); add it to parameters, or build the module "
                      f"without it")
        raise ValueError(f"torch_implementation: module parameter {target!r} is not mapped "
                         f"from the case: {reason}; it would run with the values it was built "
                         f"with")


def torch_implementation(
    build: Callable[[Case], Any],
    parameters: Mapping[str, str | tuple[str, Converter]],
    *,
    inputs: Sequence[str] = ("x",),
    supports: Supports | None = None,
    device: Any = "cpu",
    threads: int | None = 1,
    jvp: bool = True,
    hvp: bool = True,
) -> Implementation:
    r"""An :class:`~condconv_ref.testing.Implementation` of a PyTorch module.

    Parameters
    ----------
    build : callable
        ``build(case) -> nn.Module``: the module configured for the case's sizes
        and options (``case.arrays[...].shape``, ``case.options``).  Its
        parameter values do not matter; the case's replace them.
    parameters : mapping
        Reference array name -> the module's parameter (or buffer) name, dotted
        for submodules (``"routing.weight"``), or a pair ``(name, converter)``
        with ``converter(tensor, case)`` turning the reference's layout into
        the module's, e.g. ``lambda e, case: layouts.to_torch_flat_experts(e)``.
        Converters must be differentiable torch code (the converters of
        :mod:`condconv_ref.layouts` are).  Every array of a case must be mapped
        here or named in ``inputs``, and every parameter of the module must get
        its value from an array of the case (buffers may keep theirs); either
        kind of gap is reported as a failure of the implementation, naming the
        array or parameter, rather than run with the values the module was
        built with.
    inputs : sequence of str
        Case arrays passed positionally to the module: ``("x",)``, or
        ``("x", "routing")`` for the external-routing ``condconv`` variant.
    supports : Supports, optional
        Carried into the :class:`Implementation` for the checker.
    device : torch device, optional
        Where the module runs (default CPU).
    threads : int or None, optional
        torch's intra-op threads while the module runs, restored afterwards.
        The checker's cases are tiny, so one thread (the default) is the
        fastest, and it avoids OpenMP stalls on a busy machine; None leaves
        torch's setting alone.
    jvp : bool, optional
        Supply ``jvp`` too (default), so the module's forward mode is checked:
        set False for a module that uses a custom ``torch.autograd.Function``
        without a ``jvp`` rule (forward-mode AD refuses to run through it).
    hvp : bool, optional
        Supply ``hvp`` too (default), so the module's double backward is
        checked where the variant has a reference Hessian-vector product
        (:func:`~condconv_ref.variants.hvp_variants`; for the others the
        checker leaves it out and says so): set False for a module that is
        not twice differentiable on purpose (a custom ``autograd.Function``
        marked ``once_differentiable``, say).

    Returns
    -------
    Implementation
        ``forward(case)`` returns the module's output tensor; ``vjp(case,
        cotangent)`` returns autograd's gradient for every case array but the
        variant's buffers (:attr:`~condconv_ref.variants.Case.differentiable`), in the
        reference's layout (zeros for an array the output does not depend on);
        ``jvp(case, tangents)`` the output's tangent from forward-mode AD, each
        case array carrying its tangent into the module (through the
        converters) as a dual tensor; ``hvp(case, cotangent, tangents)`` the
        derivative of those gradients along the tangents by double backward:
        :math:`g = \nabla_\theta \langle c, f(\theta)\rangle` with
        ``create_graph=True``, then the gradient of :math:`\langle t, g\rangle`,
        :math:`H^\top t = H t` (zeros where a gradient does not depend on
        the arrays).

    Examples
    --------
    ``torch.nn.Conv1d`` as the plain ``conv`` variant, its weight and bias taking the
    case's ``kernel`` and ``bias`` (same layout):

    >>> import torch
    >>> from condconv_ref.testing import Supports, check_implementation, torch_implementation
    >>> def build(case):
    ...     out_channels, in_channels, size = case.arrays["kernel"].shape
    ...     return torch.nn.Conv1d(in_channels, out_channels, size, bias="bias" in case.arrays,
    ...                            padding=case.options["padding"])
    >>> conv = torch_implementation(
    ...     build, {"kernel": "weight", "bias": "bias"},
    ...     supports=Supports(spatial_dims=(1,), padding_forms=("int",), padding_modes=("zeros",),
    ...                       max_groups=1, max_stride=1, max_dilation=1))
    >>> report = check_implementation(conv, variant="conv", max_examples=10)
    >>> report.passed, report.checked_vjp, report.checked_jvp
    (True, True, True)
    """
    for name, flag in (("jvp", jvp), ("hvp", hvp)):
        if not isinstance(flag, bool):
            raise TypeError(f"torch_implementation: {name} must be True or False, got "
                            f"{flag!r}")
    mapping = parameter_mapping("torch_implementation", parameters, "a module parameter name")
    inputs = tuple(inputs)

    def run(case: Case, requires_grad: bool,
            tangents: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        import torch
        from torch.func import functional_call

        check_every_array_mapped("torch_implementation", case, mapping, inputs, "module parameters")
        dtype = getattr(torch, case.dtype)  # bfloat16 arrives as float32 holding its values
        differentiable = set(case.differentiable)
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)
                   .requires_grad_(requires_grad and name in differentiable)
                   for name, a in case.arrays.items()}
        if tangents is not None:  # inside a forward_ad.dual_level: each array with its tangent
            from torch.autograd import forward_ad

            tensors.update({name: forward_ad.make_dual(
                tensors[name], torch.from_numpy(np.ascontiguousarray(t)).to(device=device,
                                                                          dtype=dtype))
                for name, t in tangents.items()})
        module = build(case).to(device=device, dtype=dtype)
        known = dict(module.named_parameters()) | dict(module.named_buffers())
        replaced = {}
        for name, (target, converter) in mapping.items():
            if name not in tensors:
                continue
            if target not in known:
                raise ValueError(f"torch_implementation: module has no parameter or buffer "
                                 f"{target!r} (for {name!r}); it has {sorted(known)}")
            tensor = tensors[name]
            replaced[target] = tensor if converter is None else converter(tensor, case)
        _check_every_parameter_set(module, replaced, mapping, case)
        output = functional_call(module, replaced, tuple(tensors[name] for name in inputs))
        return output, tensors

    def forward(case: Case) -> Any:
        import torch

        with torch.no_grad(), _threads(threads):
            return _readable(run(case, requires_grad=False)[0])

    def gradients(case: Case, cotangent: Any, create_graph: bool
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The case's arrays as tensors, and autograd's gradient of ``<cotangent, output>``
        for each differentiable one (None where the output does not depend on it)."""
        import torch

        output, tensors = run(case, requires_grad=True)
        names = case.differentiable  # not the buffers (batch-norm running statistics)
        grads = torch.autograd.grad(output, [tensors[name] for name in names],
                                    grad_outputs=torch.as_tensor(
                                        cotangent, device=output.device, dtype=output.dtype),
                                    create_graph=create_graph, allow_unused=True)
        return tensors, dict(zip(names, grads))

    def vjp(case: Case, cotangent: Any) -> dict[str, Any]:
        with _threads(threads):
            tensors, grads = gradients(case, cotangent, create_graph=False)
        return _filled(grads, tensors)

    def second_order(case: Case, cotangent: Any, tangents: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        with _threads(threads):
            tensors, grads = gradients(case, cotangent, create_graph=True)
            moving = [name for name, grad in grads.items()  # the others are constants
                      if grad is not None and grad.requires_grad]
            second = dict.fromkeys(grads)
            if moving:
                second.update(zip(grads, torch.autograd.grad(
                    [grads[name] for name in moving], [tensors[name] for name in grads],
                    grad_outputs=[torch.from_numpy(np.ascontiguousarray(tangents[name])).to(
                        device=device, dtype=grads[name].dtype) for name in moving],
                    allow_unused=True)))
        return _filled(second, tensors)

    def forward_mode(case: Case, tangents: Mapping[str, Any]) -> Any:
        import torch
        from torch.autograd import forward_ad

        with torch.no_grad(), _threads(threads), forward_ad.dual_level():
            output, _ = run(case, requires_grad=False, tangents=tangents)
            tangent = forward_ad.unpack_dual(output).tangent
            return _readable(torch.zeros_like(output) if tangent is None else tangent)

    return Implementation(forward, vjp, supports, forward_mode if jvp else None,
                          second_order if hvp else None)


def _filled(grads: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``grads`` readable by NumPy, with zeros for the None of an array nothing depends on."""
    import torch

    return {name: _readable(torch.zeros_like(tensors[name]) if grad is None else grad)
            for name, grad in grads.items()}
