"""The ONNX translation and the ATen decomposition of vdit::tile_attention against masked attention.

Frame tile cases check against the frame-level dense oracle; family cases (3D windows, spatial windows,
global-frame unions, dense heads, token tiles) check against each family's element mask
(:mod:`family_cases`).
"""
import numpy as np
import onnx
import pytest
import torch
from family_cases import FAMILY_CASES, case_args, element_oracle

from vdit_compile import TileMask, TokenLayout
from vdit_compile.export.decompose import band_tile_attention, decompose_tile_attention
from vdit_compile.export.onnx_attention import tile_attention_custom_node, tile_attention_onnx
from vdit_compile.ops import dense_masked_attention
from vdit_compile.ops.args import encode_masks

ort = pytest.importorskip("onnxruntime")

CASES = [
    (TokenLayout(5, 3, 4, text_prefix=3, text_suffix=2), None, ["g1w0", "dense", "g0w1", "g1w0"]),
    (TokenLayout(6, 2, 3), None, ["g0w0"]),
    (TokenLayout(6, 1, 3, text_suffix=4), None, ["g2w0", "g0w2"]),
] + FAMILY_CASES
SCALE = 0.3


class OpModule(torch.nn.Module):
    """Calls the op directly; the frame count comes from the input's shape (symbolic when dynamic)."""

    def __init__(self, layout, tile, names):
        super().__init__()
        self.layout, self.tile, self.masks = layout, tile, encode_masks(names)

    def forward(self, x, text):
        B, H, T, P, D = x.shape
        lay = self.layout
        th, tw = self.tile or (lay.height, lay.width)
        seq = torch.cat([text[:, :, : lay.text_prefix], x.reshape(B, H, T * P, D), text[:, :, lay.text_prefix:]], 2)
        q, k, v = seq, seq.flip(-1) * 0.7, torch.tanh(seq)
        return torch.ops.vdit.tile_attention(q, k, v, lay.text_prefix, lay.text_suffix, [T, lay.height, lay.width, th, tw],
                                             self.masks, SCALE)


def _inputs(layout, heads, frames, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, heads, frames, layout.frame_tokens, 8, generator=g, dtype=dtype)
    text = torch.randn(1, heads, layout.text_prefix + layout.text_suffix, 8, generator=g, dtype=dtype)
    return x, text


def _oracle(mod, x, text):
    lay = mod.layout.with_frames(x.shape[2])
    B, H, T, P, D = x.shape
    seq = torch.cat([text[:, :, : lay.text_prefix], x.reshape(B, H, T * P, D), text[:, :, lay.text_prefix:]], 2).double()
    names = mod.masks.split(",") * (H if "," not in mod.masks else 1)
    return element_oracle(seq, seq.flip(-1) * 0.7, torch.tanh(seq), lay, mod.tile, names, SCALE)


def _export(mod, x, text, path, dynamic=False, table_fn=tile_attention_onnx):
    shapes = {"x": {2: torch.export.Dim("frames", min=3, max=32)}, "text": None} if dynamic else None
    prog = torch.onnx.export(mod.eval(), (x, text), dynamo=True, input_names=["x", "text"], output_names=["out", "lse"],
                             custom_translation_table={torch.ops.vdit.tile_attention.default: table_fn},
                             dynamic_shapes=shapes, verbose=False)
    prog.save(str(path))
    return str(path)


def square_values(path, n: int) -> list[str]:
    """Names of values of rank >= 4 (attention scores are (B, H, [units,] rows, keys)) ending in ``n x n``."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    out = []
    for vi in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if len(dims) >= 4 and dims[-1] == n and dims[-2] == n:
            out.append(vi.name)
    return out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_static_translation_matches_element_oracle(case, tmp_path):
    layout, tile, names = CASES[case]
    mod = OpModule(layout, tile, names)
    x, text = _inputs(layout, len(names), layout.num_frames, seed=case)
    path = _export(mod, x, text, tmp_path / "op.onnx")
    out, lse = ort.InferenceSession(path).run(None, {"x": x.numpy(), "text": text.numpy()})
    ref_o, ref_l = _oracle(mod, x, text)
    np.testing.assert_allclose(out, ref_o.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_l.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, mod(x, text)[1].numpy(), rtol=1e-5, atol=1e-5)
    if "dense" not in names:  # a sparse site never materialises L x L scores
        assert square_values(path, layout.seq_len) == []
    else:  # a dense head does (only its own head group)
        assert square_values(path, layout.seq_len)


def test_dynamic_frames_translation_is_exact_at_every_T(tmp_path):
    layout, tile, names = CASES[0]
    mod = OpModule(layout, tile, names)
    x, text = _inputs(layout, len(names), layout.num_frames, seed=7)
    sess = ort.InferenceSession(_export(mod, x, text, tmp_path / "dyn.onnx", dynamic=True))
    for frames in (3, 4, 8):
        x, _ = _inputs(layout, len(names), frames, seed=frames)
        out, lse = sess.run(None, {"x": x.numpy(), "text": text.numpy()})
        ref_o, ref_l = _oracle(mod, x, text)
        np.testing.assert_allclose(out, ref_o.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse, ref_l.numpy(), rtol=1e-5, atol=1e-5)


def test_dynamic_frames_refuses_tile_families_clearly(tmp_path):
    layout, tile, names = FAMILY_CASES[0]
    mod = OpModule(layout, tile, names)
    x, text = _inputs(layout, len(names), layout.num_frames, seed=1)
    with pytest.raises(Exception, match="fixed frame count"):
        _export(mod, x, text, tmp_path / "dyn.onnx", dynamic=True)


def test_custom_domain_node(tmp_path):
    layout, tile, names = FAMILY_CASES[0]
    mod = OpModule(layout, tile, names)
    x, text = _inputs(layout, len(names), layout.num_frames, seed=3)
    model = onnx.load(_export(mod, x, text, tmp_path / "custom.onnx", table_fn=tile_attention_custom_node))
    nodes = [n for n in model.graph.node if n.domain == "vdit"]
    assert [n.op_type for n in nodes] == ["TileAttention"] and len(nodes[0].output) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["grid"] == [5, 3, 4, 1, 2] and attrs["masks"].decode() == ",".join(names)
    assert (attrs["text_prefix"], attrs["text_suffix"]) == (3, 2) and attrs["scale"] == pytest.approx(SCALE)
    assert any(o.domain == "vdit" for o in model.opset_import)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_band_decomposition_matches_element_oracle(case):
    layout, tile, names = CASES[case]
    g = torch.Generator().manual_seed(case)
    q, k, v = (torch.randn(2, len(names), layout.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(3))
    args = (*case_args(layout, tile, names), SCALE)
    out, lse = band_tile_attention(q, k, v, *args)
    ref_o, ref_l = element_oracle(q, k, v, layout, tile, names, SCALE)
    torch.testing.assert_close(out, ref_o, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_l, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, torch.ops.vdit.tile_attention(q, k, v, *args)[1], rtol=1e-10, atol=1e-12)


def test_frame_oracle_agrees_with_element_oracle():
    """The two oracles (frame-level dense reference, element masks) agree on frame tile masks."""
    layout, tile, names = CASES[0]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, len(names), layout.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(3))
    frames = torch.stack([TileMask.parse(n).frame_mask(layout.num_frames) for n in names])
    torch.testing.assert_close(dense_masked_attention(q, k, v, layout, frames, SCALE),
                               element_oracle(q, k, v, layout, tile, names, SCALE)[0])


@pytest.mark.parametrize("case", [0, 3])
def test_decomposed_program_has_no_custom_op_and_matches(case):
    layout, tile, names = CASES[case]
    mod = OpModule(layout, tile, names).eval()
    x, text = _inputs(layout, len(names), layout.num_frames, seed=11)
    ep = decompose_tile_attention(torch.export.export(mod, (x, text)))
    assert not any("vdit" in str(n.target) for n in ep.graph.nodes)
    out, lse = ep.module()(x, text)
    ref_o, ref_l = _oracle(mod, x, text)
    torch.testing.assert_close(out, ref_o.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_l.float(), rtol=1e-5, atol=1e-5)
