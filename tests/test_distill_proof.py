"""The GPU proof driver's packing: what comes back from a device call restores into a resumable run."""
import pytest

from vdit_compile.distill.proof import _pack, _restore, parse_variants, run_names


@pytest.mark.parametrize("name", ["s4", "s8-d1"])  # a plain run and a --variant run
def test_pack_then_restore_round_trip(tmp_path, name):
    run = tmp_path / "work" / name
    files = {"config.json": "{}", "schedule.json": "{}", "mlcd/done.json": "{}", "mlcd/weights.safetensors": "W",
             "mlcd/segments.json": "[]", "masks/plan.json": "{}", "kd/weights.safetensors": "K",
             "checkpoints/kd-00000010/state.pt": "big"}
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    _pack(run, out)
    assert sorted(p.name for p in out.iterdir()) == [f"{name}-mlcd.safetensors", f"{name}.tgz"]
    again = tmp_path / "again"
    _restore(out, again, [name, "s8", "s8-d2"])  # names with nothing packed are skipped
    got = {str(p.relative_to(again / name)): p.read_text() for p in (again / name).rglob("*") if p.is_file()}
    assert got == {k: v for k, v in files.items() if not k.startswith("checkpoints")}
    assert sorted(p.name for p in again.iterdir()) == [name]


def test_variants_parse_into_run_names():
    v = parse_variants(["d1=--lr 2e-4 --lr-decay cosine", "plain="])
    assert v == {"d1": ["--lr", "2e-4", "--lr-decay", "cosine"], "plain": []}
    names = run_names([4, 8], v)
    assert list(names) == ["s4-d1", "s4-plain", "s8-d1", "s8-plain"]
    assert names["s8-d1"] == (8, ["--lr", "2e-4", "--lr-decay", "cosine"])
    assert run_names([8], {}) == {"s8": (8, [])}
    for bad in ("nolabel", "=--lr 1", "a b=--lr 1"):
        with pytest.raises(SystemExit, match="NAME=OPTIONS"):
            parse_variants([bad])
    with pytest.raises(SystemExit, match="twice"):
        parse_variants(["a=", "a=--lr 1"])
