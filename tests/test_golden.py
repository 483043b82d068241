"""Golden tests: the text of generated schedules and block code, compared with reviewed files in
``tests/golden``. Regenerate with ``HBLL_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`` after an
intended change, and review the diff."""

from __future__ import annotations

import pytest
from helpers import ZOO, assert_golden, compile_case

from hbll_compile.passes.hierarchy import build_tree
from hbll_compile.runtime.schedule import build_bp, build_dgl, build_hbll

TREE = build_tree([3, 1, 2, 2, 1])
"""Five blocks of uneven cost: the splits are not at the midpoint, and one path is shorter than L."""


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("schedule_bp.txt", build_bp(3)),
        ("schedule_dgl.txt", build_dgl(4)),
        ("schedule_wavefront_heads.txt", build_hbll(TREE, inputs="wavefront", heads=range(1, TREE.n_blocks))),
        ("schedule_tree_parareal_K1.txt", build_hbll(TREE, inputs="tree", corrections=1)),
        ("schedule_tree_jacobi_K2.txt", build_hbll(TREE, inputs="tree", corrections=2, correction="jacobi")),
    ],
)
def test_schedule_text(name: str, schedule) -> None:
    assert_golden(name, schedule.describe() + "\n")


@pytest.mark.parametrize(("case", "n"), [("resnet", 4), ("gpt", 2)])
def test_block_code(case: str, n: int) -> None:
    """The generated code of every block, the context graph and the output tail of two zoo models."""
    m = compile_case(case, n)
    parts = [f"# context\n{m.context.code.strip()}"]
    parts += [f"# block {i}\n{block.code.strip()}" for i, block in enumerate(m.blocks, 1)]
    parts.append(f"# tail (input: boundary {m.tail_info.input.index})\n{m.tail.code.strip()}")
    assert_golden(f"blocks_{case}_{n}.txt", "\n\n".join(parts) + "\n")
    assert ZOO[case].blocks  # the case is still in the zoo with its block counts
