"""The grouped-convolution batch trick: a batch of per-example kernels as one grouped conv.

Rebuilt on every docs build by the matplotlib plot directive (docs/concepts/condconv.rst).
The script first checks the trick with the library itself: CondConv of a batch equals one
``conv`` of the batch folded into channels, (1, B*C, H, W), with the mixed kernels stacked
into (B*O, C/g, k, k) and ``groups = B*g``; then it draws which input channels each output
channel of that one convolution reads.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from condconv_ref import condconv, conv, mix_experts

rng = np.random.default_rng(0)
BATCH, CHANNELS, OUT, GROUPS, EXPERTS = 3, 4, 4, 2, 3
x = rng.normal(size=(BATCH, CHANNELS, 6, 6))
experts = rng.normal(size=(EXPERTS, OUT, CHANNELS // GROUPS, 3, 3))
routing = rng.uniform(size=(BATCH, EXPERTS))

per_example = condconv(x, experts, routing, padding=1, groups=GROUPS)
kernels = mix_experts(routing, experts).reshape(BATCH * OUT, CHANNELS // GROUPS, 3, 3)
folded = conv(x.reshape(1, BATCH * CHANNELS, 6, 6), kernels, padding=1, groups=BATCH * GROUPS)
assert np.allclose(folded.reshape(per_example.shape), per_example)

colors = plt.get_cmap("tab10").colors
figure, ax = plt.subplots(figsize=(10, 4.2))
ax.set_axis_off()
ax.set_xlim(-1.5, 17)
ax.set_ylim(-1.2, BATCH * CHANNELS + 1.8)


def column(left, count, label, color_of, per_row):
    for row in range(count):
        ax.add_patch(Rectangle((left, count - 1 - row), 1.6, 0.9, color=color_of(row),
                               alpha=0.35 + 0.3 * ((row // per_row) % 2)))
        ax.text(left + 0.8, count - 0.55 - row, label(row), ha="center", va="center",
                fontsize=7)


rows = BATCH * CHANNELS
column(0, rows, lambda r: f"x[{r // CHANNELS}, {r % CHANNELS}]",
       lambda r: colors[r // CHANNELS], CHANNELS // GROUPS)
ax.text(0.8, rows + 0.6, "input as (1, B*C, H, W)", ha="center", fontsize=9)
column(12, BATCH * OUT, lambda r: f"y[{r // OUT}, {r % OUT}]",
       lambda r: colors[r // OUT], OUT // GROUPS)
ax.text(12.8, rows + 0.6, "output (1, B*O, H, W)", ha="center", fontsize=9)
for r in range(BATCH * OUT):
    group = r // (OUT // GROUPS)
    read = range(group * (CHANNELS // GROUPS), (group + 1) * (CHANNELS // GROUPS))
    for c in read:
        ax.annotate("", xy=(12, BATCH * OUT - 0.55 - r), xytext=(1.6, rows - 0.55 - c),
                    arrowprops=dict(arrowstyle="-", color=colors[r // OUT], alpha=0.5, lw=0.8))
ax.text(6.8, -0.9, f"one conv with groups = B*g = {BATCH * GROUPS}; kernel of output channel "
        f"b*O + o: example b's mixed kernel M_b[o]", ha="center", fontsize=9)
ax.text(15.2, rows / 2, "reshape to\n(B, O, H, W)\n= CondConv,\nexample by\nexample", va="center",
        fontsize=9)
