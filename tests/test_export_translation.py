"""The ONNX translation and the ATen decomposition of vdit::tile_attention against dense masked SDPA."""
import numpy as np
import onnx
import pytest
import torch

from vdit_compile import TileMask, TokenLayout
from vdit_compile.export.decompose import band_tile_attention, decompose_tile_attention
from vdit_compile.export.onnx_attention import tile_attention_custom_node, tile_attention_onnx
from vdit_compile.masks.tile import frame_masks, op_mask_args
from vdit_compile.ops import dense_masked_attention

ort = pytest.importorskip("onnxruntime")

CASES = [
    (TokenLayout(5, 3, 4, text_prefix=3, text_suffix=2), [TileMask(1, 0), TileMask(dense=True), TileMask(0, 1), TileMask(1, 0)]),
    (TokenLayout(6, 2, 3), [TileMask(0, 0)]),
    (TokenLayout(6, 1, 3, text_suffix=4), [TileMask(2, 0), TileMask(0, 2)]),
]
SCALE = 0.3


class OpModule(torch.nn.Module):
    """Calls the op directly; with ``frames_input`` the frame count comes from the input's shape."""

    def __init__(self, layout, masks):
        super().__init__()
        self.layout, (self.g, self.w) = layout, op_mask_args(masks)

    def forward(self, x, text):
        B, H, T, P, D = x.shape
        lay = self.layout
        seq = torch.cat([text[:, :, : lay.text_prefix], x.reshape(B, H, T * P, D), text[:, :, lay.text_prefix:]], 2)
        q, k, v = seq, seq.flip(-1) * 0.7, torch.tanh(seq)
        return torch.ops.vdit.tile_attention(q, k, v, lay.text_prefix, lay.text_suffix, T, self.g, self.w, SCALE)


def _inputs(layout, heads, frames, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, heads, frames, layout.frame_tokens, 8, generator=g, dtype=dtype)
    text = torch.randn(1, heads, layout.text_prefix + layout.text_suffix, 8, generator=g, dtype=dtype)
    return x, text


def _oracle(mod, layout, masks, x, text):
    lay = layout.with_frames(x.shape[2])
    with torch.no_grad():
        B, H, T, P, D = x.shape
        seq = torch.cat([text[:, :, : lay.text_prefix], x.reshape(B, H, T * P, D), text[:, :, lay.text_prefix:]], 2).double()
        return dense_masked_attention(seq, seq.flip(-1) * 0.7, torch.tanh(seq), lay, frame_masks(masks, T), SCALE)


def _export(mod, x, text, path, dynamic=False, table_fn=tile_attention_onnx):
    shapes = {"x": {2: torch.export.Dim("frames", min=3, max=32)}, "text": None} if dynamic else None
    prog = torch.onnx.export(mod.eval(), (x, text), dynamo=True, input_names=["x", "text"], output_names=["out", "lse"],
                             custom_translation_table={torch.ops.vdit.tile_attention.default: table_fn},
                             dynamic_shapes=shapes, verbose=False)
    prog.save(str(path))
    return str(path)


def square_values(path, n: int) -> list[str]:
    """Names of values of rank >= 4 (attention scores are (B, H, [frames,] rows, keys)) ending in ``n x n``."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    out = []
    for vi in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if len(dims) >= 4 and dims[-1] == n and dims[-2] == n:
            out.append(vi.name)
    return out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_static_translation_matches_dense_masked_sdpa(case, tmp_path):
    layout, masks = CASES[case]
    mod = OpModule(layout, masks)
    x, text = _inputs(layout, len(masks), layout.num_frames, seed=case)
    path = _export(mod, x, text, tmp_path / "op.onnx")
    out, lse = ort.InferenceSession(path).run(None, {"x": x.numpy(), "text": text.numpy()})
    ref = _oracle(mod, layout, masks, x, text)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, mod(x, text)[1].numpy(), rtol=1e-5, atol=1e-5)
    if not any(m.dense for m in masks):  # a sparse site never materialises L x L scores
        assert square_values(path, layout.seq_len) == []
    else:  # the dense head of case 0 does (only its own head group: 1 head)
        assert square_values(path, layout.seq_len)


def test_dynamic_frames_translation_is_exact_at_every_T(tmp_path):
    layout, masks = CASES[0]
    mod = OpModule(layout, masks)
    x, text = _inputs(layout, len(masks), layout.num_frames, seed=7)
    sess = ort.InferenceSession(_export(mod, x, text, tmp_path / "dyn.onnx", dynamic=True))
    for frames in (3, 4, 8):
        x, _ = _inputs(layout, len(masks), frames, seed=frames)
        out, lse = sess.run(None, {"x": x.numpy(), "text": text.numpy()})
        np.testing.assert_allclose(out, _oracle(mod, layout, masks, x, text).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse, mod(x, text)[1].numpy(), rtol=1e-5, atol=1e-5)


def test_custom_domain_node(tmp_path):
    layout, masks = CASES[0]
    mod = OpModule(layout, masks)
    x, text = _inputs(layout, len(masks), layout.num_frames, seed=3)
    model = onnx.load(_export(mod, x, text, tmp_path / "custom.onnx", table_fn=tile_attention_custom_node))
    nodes = [n for n in model.graph.node if n.domain == "vdit"]
    assert [n.op_type for n in nodes] == ["TileAttention"] and len(nodes[0].output) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    g, w = op_mask_args(masks)
    assert attrs["global_frames"] == g and attrs["windows"] == w
    assert (attrs["text_prefix"], attrs["text_suffix"]) == (3, 2) and attrs["scale"] == pytest.approx(SCALE)
    assert any(o.domain == "vdit" for o in model.opset_import)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_band_decomposition_matches_dense_masked_sdpa(case):
    layout, masks = CASES[case]
    g = torch.Generator().manual_seed(case)
    q, k, v = (torch.randn(2, len(masks), layout.seq_len, 8, generator=g, dtype=torch.float64) for _ in range(3))
    gs, ws = op_mask_args(masks)
    args = (layout.text_prefix, layout.text_suffix, layout.num_frames, gs, ws, SCALE)
    out, lse = band_tile_attention(q, k, v, *args)
    ref = dense_masked_attention(q, k, v, layout, frame_masks(masks, layout.num_frames), SCALE)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, torch.ops.vdit.tile_attention(q, k, v, *args)[1], rtol=1e-10, atol=1e-12)


def test_decomposed_program_has_no_custom_op_and_matches():
    layout, masks = CASES[0]
    mod = OpModule(layout, masks).eval()
    x, text = _inputs(layout, len(masks), layout.num_frames, seed=11)
    ep = decompose_tile_attention(torch.export.export(mod, (x, text)))
    assert not any("vdit" in str(n.target) for n in ep.graph.nodes)
    out, lse = ep.module()(x, text)
    torch.testing.assert_close(out, _oracle(mod, layout, masks, x, text).float(), rtol=1e-5, atol=1e-5)
