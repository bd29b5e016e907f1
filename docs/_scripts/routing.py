"""Routing weights and the kernels they mix: CondConv's sigmoid gates against DynamicConv's
softmax at three temperatures, and one example's mixed kernel.

Rebuilt on every docs build by the matplotlib plot directive (docs/concepts/condconv.rst).
Every number comes from the library: ``route_sigmoid``, ``route_softmax`` and
``mix_experts`` on one random batch, and the script checks that the mixed kernel is the
weighted sum of the experts it draws, so the picture cannot drift from the code.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from condconv_ref import mix_experts, route_sigmoid, route_softmax

rng = np.random.default_rng(4)
BATCH, CHANNELS, EXPERTS, HIDDEN = 6, 8, 4, 4
x = rng.normal(size=(BATCH, CHANNELS, 5, 5)) + rng.normal(size=(BATCH, CHANNELS, 1, 1))
experts = rng.normal(size=(EXPERTS, 1, 1, 3, 3))

gates = route_sigmoid(x, rng.normal(size=(EXPERTS, CHANNELS)), rng.normal(size=EXPERTS))
fc1, fc2 = rng.normal(size=(HIDDEN, CHANNELS)), 2 * rng.normal(size=(EXPERTS, HIDDEN))
temperatures = (30.0, 4.0, 1.0)
attention = {t: route_softmax(x, fc1, fc2, temperature=t) for t in temperatures}
mixed = mix_experts(gates, experts)
assert np.allclose(mixed[0], np.tensordot(gates[0], experts, axes=1))

figure = plt.figure(figsize=(11, 6))
grid = figure.add_gridspec(2, EXPERTS + 1, height_ratios=(1.25, 1))

ax = figure.add_subplot(grid[0, :3])
ax.imshow(gates.T, vmin=0, vmax=1, cmap="viridis")
for b in range(BATCH):
    for e in range(EXPERTS):
        ax.text(b, e, f"{gates[b, e]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if gates[b, e] < 0.6 else "black")
ax.set(title="CondConv: sigmoid gates, each in (0, 1)", xlabel="example b (and its sum of gates)",
       ylabel="expert e", xticks=range(BATCH), yticks=range(EXPERTS),
       xticklabels=[f"{b}\n{gates[b].sum():.2f}" for b in range(BATCH)])

ax = figure.add_subplot(grid[0, 3:])
width = 0.8 / len(temperatures)
for i, t in enumerate(temperatures):
    ax.bar(np.arange(EXPERTS) + (i - 1) * width, attention[t][0], width, label=f"T = {t:g}")
ax.axhline(1 / EXPERTS, color="gray", lw=0.8, ls=":")
ax.set(title="DynamicConv: softmax over experts, example 0", xlabel="expert e",
       ylabel="attention (sums to 1)", xticks=range(EXPERTS), ylim=(0, 1.05))
ax.legend(fontsize=8)

limit = np.abs(experts).max()
for e in range(EXPERTS):
    ax = figure.add_subplot(grid[1, e])
    ax.imshow(experts[e, 0, 0], cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set(title=f"{gates[0, e]:.2f} x W{e}", xticks=[], yticks=[])
ax = figure.add_subplot(grid[1, EXPERTS])
ax.imshow(mixed[0, 0, 0], cmap="RdBu_r", vmin=-limit, vmax=limit)
ax.set(title="= M_0, convolved once", xticks=[], yticks=[])
