"""Both window families (``win3d``, ``spatial``) against a brute-force construction of their masks.

The oracle restates the families' rule in plain Python on integer coordinates, independently of
``masks.box`` and of the unit machinery: on each axis the kept keys are the ``2r + 1`` units starting at the
query's unit minus ``r``, that start clamped into the axis (so the window keeps its size at the borders), the
whole axis when it is shorter than the window; a spatial window does this on the tile rows and columns only
(every frame kept); ``-g<G>`` keeps the full rows and columns of the first ``G`` frames; text rows and columns
are always kept. Token coordinates are computed by hand from the layout's order (``THW`` or frame-minor
``HWT``). Sizes are odd and tiles not square, with text prefix and suffix.
"""
import itertools

import pytest
import torch

from vdit_compile import TokenLayout
from vdit_compile.masks import UnitGrid, parse_mask

CASES = [  # layout, tile (rows, cols)
    (TokenLayout(5, 3, 5, text_prefix=3, text_suffix=2), (1, 1)),
    (TokenLayout(7, 9, 3, text_suffix=4), (3, 1)),
    (TokenLayout(3, 5, 7, text_prefix=2, order="HWT"), (1, 7)),
    (TokenLayout(9, 1, 5, text_prefix=1, text_suffix=1), (1, 1)),
]
#: (name, t, h, w, g): the radii the oracle uses are these numbers, not the parsed spec's (t None: every frame)
SPECS = ([(f"win3d-t{t}h{h}w{w}" + (f"-g{g}" if g else ""), t, h, w, g)
          for t, h, w, g in itertools.product((0, 1, 2, 4), (0, 1, 3), (0, 2), (0, 2))]
         + [(f"spatial-h{h}w{w}" + (f"-g{g}" if g else ""), None, h, w, g)
            for h, w, g in itertools.product((0, 1, 3), (0, 1, 2), (0, 2))])


def _window(qc: int, kc: int, r: int, n: int) -> bool:
    if 2 * r + 1 >= n:
        return True
    start = min(max(qc - r, 0), n - 1 - 2 * r)
    return start <= kc <= start + 2 * r


def _unit_oracle(t: int | None, h: int, w: int, g: int, T: int, nh: int, nw: int) -> torch.Tensor:
    units = [(f, i, j) for f in range(T) for i in range(nh) for j in range(nw)]  # frame-major, tile row, tile column
    rows = []
    for qf, qi, qj in units:
        rows.append([(qf < g or kf < g)
                     or ((t is None or _window(qf, kf, t, T)) and _window(qi, ki, h, nh) and _window(qj, kj, w, nw))
                     for kf, ki, kj in units])
    return torch.tensor(rows, dtype=torch.bool)


def _token_units(layout: TokenLayout, th: int, tw: int) -> list[int]:
    """Unit index of every video token in the model's own order."""
    T, H, W = layout.num_frames, layout.height, layout.width
    nh, nw = H // th, W // tw
    out = []
    for i in range(T * H * W):
        if layout.order == "HWT":
            h, w, t = i // (W * T), (i // T) % W, i % T
        else:
            t, h, w = i // (H * W), (i // W) % H, i % W
        out.append((t * nh + h // th) * nw + w // tw)
    return out


@pytest.mark.parametrize("layout,tile", CASES)
def test_window_families_equal_the_brute_force_masks(layout, tile):
    T, H, W = layout.num_frames, layout.height, layout.width
    th, tw = tile
    grid = UnitGrid(T, H, W, th, tw, frame_minor=layout.order == "HWT")
    pre, nv, L = layout.text_prefix, layout.video_tokens, layout.seq_len
    video = torch.tensor(_token_units(layout, th, tw))
    for name, t, h, w, g in SPECS:
        spec = parse_mask(name)
        expected_units = _unit_oracle(t, h, w, g, T, H // th, W // tw)
        assert torch.equal(spec.unit_mask(grid), expected_units), name
        expected = torch.ones(L, L, dtype=torch.bool)
        expected[pre:pre + nv, pre:pre + nv] = expected_units[video[:, None], video[None, :]]
        assert torch.equal(spec.element_mask(layout, grid), expected), name
