"""Automatic unit padding (``kernels/padding.py``): the rule, the gather, the visit lists, and the kernels.

* the rule and its ``KernelOptions`` switch; the padded gather (``ops/reorder.PaddedUnits``) against the plain
  reorder; the padded visit lists against an element-by-element classification (CPU, no Triton needed);
* the op's CUDA implementation on padded units under ``TRITON_INTERPRET=1`` (a subprocess per group, as in
  ``test_kernel_interpret.py``): forward, LSE and backward against the float64 dense oracle with each head's
  element mask (``tests/pad_cases.py``), portable forward + backward, then the TMA forward;
* the same cases on a CUDA GPU (``gpu``: skipped on CPU), bf16 and fp16, both forward paths, plus 720p-like tiles
  with the table's 64/128-token blocks.
"""
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pad_cases import CPU_CASES, GPU_CASES, check_pad_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the rule
def test_padding_rule():
    from vdit_compile.kernels.padding import padded_unit_tokens

    cases = {120: 128, 250: 256, 600: 640, 1000: 1024, 128: 128, 64: 64, 192: 192, 256: 256,
             135: 135, 45: 45, 20: 20, 90: 90, 1350: 1350, 3600: 3600}
    assert {p: padded_unit_tokens(p) for p in cases} == cases
    assert padded_unit_tokens(45, max_waste=1.0) == 64
    assert padded_unit_tokens(135, max_waste=0.5) == 192  # 256 wastes 90%: the 64-multiple
    assert padded_unit_tokens(1350, max_tokens=4096) == 1408  # 11 x 128 would waste 4.3%; allowed with a larger cap
    assert padded_unit_tokens(120, max_waste=0.0) == 120
    with pytest.raises(ValueError):
        padded_unit_tokens(0)


def test_padding_switch():
    from vdit_compile.kernels.options import KernelOptions, kernel_options
    from vdit_compile.kernels.padding import unit_stride

    assert KernelOptions().unit_pad  # on since its first GPU run (kernels/options.py)
    assert unit_stride(120) == 128
    with kernel_options(unit_pad=False):
        assert unit_stride(120) == 120
    with kernel_options(unit_pad=True, unit_pad_max_waste=1.0):
        assert unit_stride(45) == 64
    assert unit_stride(120, KernelOptions(unit_pad=True, unit_pad_max_tokens=100)) == 120
    assert KernelOptions.from_env({"VDIT_UNIT_PAD": "0"}) == KernelOptions(unit_pad=False)
    assert KernelOptions.from_env({}).unit_pad
    with pytest.raises(ValueError, match="unit_pad_max_waste"):
        KernelOptions(unit_pad_max_waste=-1.0)


# ----------------------------------------------------------------------------- the gather
@pytest.mark.parametrize("order", ["THW", "HWT"])
def test_padded_gather_matches_the_reorder(order):
    from vdit_compile import TokenLayout
    from vdit_compile.masks import UnitGrid
    from vdit_compile.ops.reorder import PaddedUnits, to_units

    lay = TokenLayout(3, 10, 18, text_prefix=5, text_suffix=4, order=order)
    grid = UnitGrid(3, 10, 18, 5, 9, frame_minor=order == "HWT")
    pad = PaddedUnits(grid, 5, 4, 64)
    x = torch.randn(2, 3, lay.seq_len, 8)
    y = pad.to_kernel(x)
    N, P, Pp = grid.num_units, grid.unit_tokens, 64
    assert y.shape == (2, 3, N * Pp + 9, 8)
    assert pad.layout.seq_len == y.shape[2] and pad.layout.text_prefix == 0 and pad.layout.frame_tokens == Pp
    units = y[:, :, :N * Pp].unflatten(2, (N, Pp))
    torch.testing.assert_close(units[:, :, :, :P].flatten(2, 3), to_units(x, 5, grid)[:, :, 5:5 + N * P], rtol=0, atol=0)
    assert units[:, :, :, P:].abs().max() == 0  # pad tokens zero
    torch.testing.assert_close(y[:, :, N * Pp:], torch.cat([x[:, :, :5], x[:, :, -4:]], 2), rtol=0, atol=0)
    torch.testing.assert_close(pad.from_kernel(y), x, rtol=0, atol=0)
    lse = torch.randn(2, 3, lay.seq_len)
    torch.testing.assert_close(pad.from_kernel(pad.to_kernel(lse)), lse, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the visit lists
def _element_check(qside, kside, fm, block_q, block_k):
    """Every block classification of a padded plan against the elements it covers."""
    from vdit_compile.kernels.checks import token_mask
    from vdit_compile.kernels.visit import block_classes, extended_masks, pad_tails

    keep, partial = block_classes(extended_masks(fm), qside, kside, block_q, block_k)
    tail = pad_tails(keep, partial, kside, block_k)

    def real(s):
        i = torch.arange(s.length)
        rel = i - s.text_prefix
        return (rel < 0) | (i >= s.video_end) | (rel % s.frame_tokens < s.valid_tokens)

    rq, rk = real(qside), real(kside)
    tok = token_mask(qside, kside, fm)  # segment-level keep, pad tokens counted as their unit's
    nq, nk = keep.shape[1:]
    tq = torch.nn.functional.pad(tok, (0, nk * block_k - kside.length, 0, nq * block_q - qside.length))
    need = tq & torch.nn.functional.pad(rq, (0, nq * block_q - qside.length))[None, :, None] \
        & torch.nn.functional.pad(rk, (0, nk * block_k - kside.length))[None, None, :]
    need_b = need.view(-1, nq, block_q, nk, block_k).any(4).any(2)
    kept_b = tq.view(-1, nq, block_q, nk, block_k).all(4).all(2)
    k_real = torch.nn.functional.pad(rk, (0, nk * block_k - kside.length)).view(nk, block_k)
    q_real = torch.nn.functional.pad(rq, (0, nq * block_q - qside.length)).view(nq, block_q)
    assert not (need_b & ~keep).any(), "a block with a kept real entry is not visited"
    full = keep & ~partial
    assert not (full & ~kept_b).any(), "an unmasked block holds a skipped entry"
    assert not (full & ~tail & ~k_real.all(1)[None, None, :]).any(), "an unmasked block, not a pad tail, holds pad keys"
    assert not (tail & k_real.all(1)[None, None, :]).any(), "a pad tail without pad keys"
    assert not (keep & ~k_real.any(1)[None, None, :]).any(), "a block of pad keys alone is visited"
    assert not (keep & ~q_real.any(1)[None, :, None]).any(), "a block of pad queries alone is visited"
    return keep, partial


@pytest.mark.parametrize("P,stride,pre,suf", [(45, 64, 0, 7), (120, 128, 0, 0), (135, 192, 0, 20), (45, 64, 5, 3)])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (64, 64), (128, 64), (64, 32)])
def test_padded_visit_lists_against_elements(P, stride, pre, suf, blocks):
    from vdit_compile.kernels.visit import Side

    N = 7
    side = Side(pre + N * stride + suf, pre, N, stride, P)
    g = torch.Generator().manual_seed(P + blocks[0])
    fm = torch.rand(2, N, N, generator=g) < 0.4
    fm[0] |= torch.eye(N, dtype=torch.bool)
    _element_check(side, side, fm, *blocks)


@pytest.mark.parametrize("mask", ["win3d-t4h1w1", "spatial-h0w0-g1"])
def test_padding_makes_720p_window_blocks_whole(mask):
    """At the real Wan 720p shape (15 x 8 tiles) padding to 128 leaves no masked block in the forward's and dq's
    visit lists (every block pair lies in one query unit and one key unit; the key blocks holding pad are pad
    tails) and fewer visits; built on the CPU from the same unit mask, with the table's 128 x 64 and 64 x 32 tiles.
    Measured (win3d-t4h1w1, 128 x 64): 132,935 visits, 85,114 masked -> 102,060 visits, 0 masked, 51,030 pad tails."""
    from vdit_compile.kernels.visit import Side, tile_plan
    from vdit_compile.masks import UnitGrid, parse_mask

    grid = UnitGrid(21, 45, 80, 15, 8)
    fm = parse_mask(mask).unit_mask(grid)[None]
    N = grid.num_units
    plain = tile_plan(Side(N * 120, 0, N, 120), Side(N * 120, 0, N, 120), fm, 1, "cpu")
    padded = tile_plan(Side(N * 128, 0, N, 128, 120), Side(N * 128, 0, N, 128, 120), fm, 1, "cpu")
    for blocks in ((128, 64), (64, 32)):
        a, b = plain.visits(*blocks), padded.visits(*blocks)
        assert int(a.needs_mask.sum()) > a.num_visits // 5 and int(b.needs_mask.sum()) == 0, blocks
        assert b.num_visits < a.num_visits and int(b.num_pad_tail.sum()) == b.num_visits // (128 // blocks[1]), blocks


# ----------------------------------------------------------------------------- the kernels, interpreted
def _run_group(group: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from vdit_compile.kernels.options import current, kernel_options

    tma = group == "pad_tma"
    assert tma == (current().path == "tma")
    for i, case in enumerate(CPU_CASES):
        errs = check_pad_case(case, seed=200 + i, backward=not tma)
        print(f"ok {group} {case.name}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    if not tma:  # the switch: no padding, no padded plan, the same answer
        import importlib

        from vdit_compile.kernels import tile_attention_triton as tat
        from vdit_compile.ops.args import resolve

        op_mod = importlib.import_module("vdit_compile.ops.tile_attention")
        case = CPU_CASES[-1]
        q = torch.randn(1, len(case.masks), case.layout.seq_len, 16)
        om = resolve(q.shape[1], case.op_args(0.25)[2], case.op_args(0.25)[3])
        assert tat.unit_padding(q, q, q, om) == 128
        with kernel_options(unit_pad=False):
            assert tat.unit_padding(q, q, q, om) is None
            assert op_mod._cuda_padding(q, q, q, om, 6, 0) is None
        print(f"ok {group} switch", flush=True)


GROUPS = ["pad", "pad_tma"]


@pytest.mark.parametrize("group", GROUPS)
def test_padded_op_under_interpreter(group):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("VDIT_KERNEL_PATH", None)
    env["VDIT_UNIT_PAD"] = "1"  # explicit, whatever the caller's environment says (on by default: kernels/options.py)
    if group == "pad_tma":
        env["VDIT_KERNEL_PATH"] = "tma"
    r = subprocess.run([sys.executable, __file__, group], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"interpreter group {group} failed:\n{r.stdout}\n{r.stderr[-6000:]}"
    assert r.stdout.count("ok ") == len(CPU_CASES) + (group == "pad"), r.stdout


# ----------------------------------------------------------------------------- the kernels on a GPU
BF16 = dict(dtype=torch.bfloat16, tol=(2e-2, 2e-2), grad_tol=(3e-2, 3e-2))
FP16 = dict(dtype=torch.float16, tol=(4e-3, 4e-3), grad_tol=(1e-2, 1e-2))


def _gpu_params():
    """Every case in bf16 on both forward paths, the GPU-only ones in fp16 on the portable path too; the
    interpreter's D = 16 cases at D = 64 (one compile fewer)."""
    from dataclasses import replace

    out = []
    for case in GPU_CASES:
        case = replace(case, head_dim=max(case.head_dim, 64))
        out += [pytest.param(case, "bf16", path, id=f"{case.name}-bf16-{path}") for path in ("portable", "tma")]
        if case.name not in {c.name for c in CPU_CASES}:
            out.append(pytest.param(case, "fp16", "portable", id=f"{case.name}-fp16-portable"))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case,prec,path", _gpu_params())
def test_padded_op_on_gpu(case, prec, path):
    from vdit_compile.kernels.options import kernel_options

    if path == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA forward needs an sm90+ GPU")
    with kernel_options(path=path):
        check_pad_case(case, device="cuda", seed=zlib.crc32(case.name.encode()) % 1000, **(BF16 if prec == "bf16" else FP16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_padding_changes_nothing_but_speed_on_gpu():
    """A 720p-like call padded and unpadded (``unit_pad=False``) agree to rounding; both paths are CUDA kernels."""
    from vdit_compile.kernels.options import kernel_options

    case = next(c for c in GPU_CASES if c.name.startswith("720p-like"))
    H, L = len(case.masks), case.layout.seq_len
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, H, L, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    args = case.op_args(128 ** -0.5)
    with kernel_options(unit_pad=True):
        padded = torch.ops.vdit.tile_attention(q, k, v, *args)
    with kernel_options(unit_pad=False):
        plain = torch.ops.vdit.tile_attention(q, k, v, *args)
    torch.testing.assert_close(padded[0].float(), plain[0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(padded[1], plain[1], rtol=1e-3, atol=1e-3)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_kernel_changes_nothing_in_the_padded_op_on_gpu():
    """The Triton row gather (``KernelOptions.gather_kernel``) moves the same rows as ``index_select``: the padded
    op's output, lse and gradients are identical with it on and off, strided (B, L, H, D) inputs included."""
    from vdit_compile.kernels.options import kernel_options

    case = next(c for c in GPU_CASES if c.name.startswith("720p-like"))
    H, L = len(case.masks), case.layout.seq_len
    g = torch.Generator(device="cuda").manual_seed(2)
    base = [torch.randn(1, L, H, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    do = torch.randn(1, H, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    args = case.op_args(128 ** -0.5)
    results = []
    for on in (False, True):
        q, k, v = (x.clone().transpose(1, 2).requires_grad_() for x in base)
        with kernel_options(gather_kernel=on):
            out, lse = torch.ops.vdit.tile_attention(q, k, v, *args)
            (out.float() * do.float()).sum().add(lse.sum()).backward()
        results.append((out, lse, q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)

if __name__ == "__main__":
    _run_group(sys.argv[1])
