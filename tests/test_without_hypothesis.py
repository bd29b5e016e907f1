"""Without hypothesis: the ops, golden vectors, the variant registry and layouts still work,
and the commands that draw cases with it say so in one line.

Each test runs a fresh interpreter in which ``sys.modules["hypothesis"] = None`` is set
before ``condconv_ref`` is imported, so every ``import hypothesis`` fails there as it
does where hypothesis is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

from condconv_ref.testing import ConvConfig
from condconv_ref.variants import VARIANTS, build_case, reference_forward

BLOCK_HYPOTHESIS = 'import sys\nsys.modules["hypothesis"] = None\n'

# Depthwise (groups == C), so every variant, depthwise ones included, builds from it.
CONFIG = dict(batch=2, in_channels=2, out_channels=4, groups=2, spatial=(5, 4), kernel=(3, 2),
              stride=(1, 2), dilation=(1, 1), padding="same", padding_mode="reflect",
              n_experts=3, bias=True)

LIBRARY = BLOCK_HYPOTHESIS + textwrap.dedent('''
    import ast, hashlib, json
    import numpy as np
    import condconv_ref
    from condconv_ref import golden, layouts
    from condconv_ref.testing import ConvConfig, arrays_for
    from condconv_ref.variants import VARIANTS, build_case, reference_forward, reference_vjp

    backend, config = sys.argv[1], ConvConfig(**ast.literal_eval(sys.argv[2]))
    report = golden.verify(golden.SHIPPED, backend=backend)
    built = {}
    for variant in VARIANTS:
        case = build_case(variant, config, seed=1)
        y = reference_forward(case, backend)
        gradients = reference_vjp(case, np.ones(tuple(y.shape)), backend)
        digest = hashlib.sha256(b"".join(a.tobytes() for a in case.arrays.values())).hexdigest()
        built[variant] = {"digest": digest, "output": list(y.shape),
                          "gradients": sorted(gradients), "arrays": sorted(case.arrays)}
    experts = arrays_for(config, xp=np, seed=2).experts
    flat = layouts.to_tf_flat_experts(experts)
    print(json.dumps({
        "hypothesis": repr(sys.modules["hypothesis"]),
        "golden": [report.passed, len(report.results), report.compared],
        "built": built,
        "layouts": bool(np.array_equal(
            layouts.from_tf_flat_experts(flat, config.kernel_shape), experts)),
        "ops": sorted(name for name in condconv_ref.__all__ if callable(getattr(condconv_ref, name))),
    }))
''')


def _run(script: str, *args: str) -> dict:
    environment = {**os.environ, "JAX_ENABLE_X64": "1"}  # float64 on the jax backend
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _digest(case) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in case.arrays.values())).hexdigest()


def test_golden_vectors_variants_and_layouts_work_without_hypothesis(backend):
    found = _run(LIBRARY, backend.name, repr(CONFIG))
    assert found["hypothesis"] == "None"  # nothing imported it behind the test's back
    assert found["golden"] == [True, 49, f"reference on {backend.name}"]
    assert found["layouts"]
    assert "condconv_layer" in found["ops"] and "MemoryBudgetError" in found["ops"]
    config = ConvConfig(**CONFIG)
    assert sorted(found["built"]) == sorted(VARIANTS)
    for variant, built in found["built"].items():
        case = build_case(variant, config, seed=1)  # here, with hypothesis importable
        assert built["digest"] == _digest(case), f"{variant} builds other arrays"
        assert built["arrays"] == built["gradients"] == sorted(case.arrays)
        assert tuple(built["output"]) == reference_forward(case).shape


COMMANDS = BLOCK_HYPOTHESIS + textwrap.dedent('''
    import contextlib, io, json
    from condconv_ref.cli import main

    folder = sys.argv[1]
    with open(f"{folder}/mine.py", "w") as file:
        file.write("from condconv_ref.variants import reference_forward\\n"
                   "def factory():\\n    return reference_forward\\n")
    commands = {
        "verify": ["verify", "--cases", "1"],
        "golden write": ["golden", "write", "--out", f"{folder}/set", "--variant", "conv"],
        "check": ["check", f"{folder}/mine.py:factory", "--variant", "condconv_layer"],
        "gpu-check": ["gpu-check", "--backend", "numpy", "--cases", "1", "--no-tf32",
                      "--no-torch"],
        "golden verify": ["golden", "verify", "--variant", "conv"],
    }
    results = {}
    for name, argv in commands.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
        results[name] = [status, [line for line in err.getvalue().splitlines() if line.strip()]]
    print(json.dumps(results))
''')


def test_commands_that_draw_cases_need_hypothesis_and_say_so_in_one_line(tmp_path):
    results = _run(COMMANDS, str(tmp_path))
    assert results.pop("golden verify") == [0, []]  # reading vectors needs no hypothesis
    for name, (status, lines) in results.items():
        assert status == 2, name
        assert len(lines) == 1 and "Traceback" not in lines[0], (name, lines)
        command = name.split()[0]
        assert lines[0].startswith(f"condconv-ref {command}: error: hypothesis is not "
                                   f"available: cannot import hypothesis"), lines[0]
        assert lines[0].endswith("(pip install hypothesis)")
    assert not (tmp_path / "set").exists()  # golden write stopped before touching it
