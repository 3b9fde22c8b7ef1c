"""The timing-only visit-list variants of ``benchmarks/kernel_anatomy.py`` have the structure they claim (CPU)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from kernel_anatomy import variants  # noqa: E402

from vdit_compile.kernels.visit import Side, tile_plan  # noqa: E402
from vdit_compile.masks.tile import TileMask  # noqa: E402


def test_variants_keep_columns_and_change_only_what_they_say():
    side = Side(10 + 3 * 50 + 7, 10, 3, 50)  # prefix, three frames, suffix: masked and unmasked blocks in most rows
    vl = tile_plan(side, side, TileMask.parse("g1w0").frame_mask(3)[None], 2, "cpu").visits(16, 16)
    v = variants(vl)
    counts = (vl.offsets[1:] - vl.offsets[:-1]).tolist()
    assert 0 < int(vl.needs_mask.sum()) < vl.num_visits
    assert v["no_mask"].num_unmasked.tolist() == counts and torch.equal(v["no_mask"].cols, vl.cols)
    assert v["all_masked"].num_unmasked.tolist() == [0] * len(counts) and torch.equal(v["all_masked"].cols, vl.cols)
    d = v["doubled"]
    for r in range(vl.n_rows):
        a, b, nu = vl.offsets[r].item(), vl.offsets[r + 1].item(), vl.num_unmasked[r].item()
        a2, b2 = d.offsets[r].item(), d.offsets[r + 1].item()
        cols, cols2 = vl.cols[a:b].tolist(), d.cols[a2:b2].tolist()
        assert cols2 == cols[:nu] * 2 + cols[nu:] * 2
        assert d.num_unmasked[r].item() == 2 * nu
        assert d.needs_mask[a2:b2].tolist() == [False] * (2 * nu) + [True] * (2 * (len(cols) - nu))
