"""The GPU proof driver's packing: what comes back from a device call restores into a resumable run."""
from pathlib import Path

from vdit_compile.distill.proof import _pack, _restore


def test_pack_then_restore_round_trip(tmp_path):
    run = tmp_path / "work" / "s4"
    files = {"config.json": "{}", "schedule.json": "{}", "mlcd/done.json": "{}", "mlcd/weights.safetensors": "W",
             "masks/plan.json": "{}", "kd/weights.safetensors": "K", "checkpoints/kd-00000010/state.pt": "big"}
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    _pack(run, out)
    assert sorted(p.name for p in out.iterdir()) == ["s4-mlcd.safetensors", "s4.tgz"]
    again = tmp_path / "again"
    _restore(out, again, [4, 8])
    got = {str(p.relative_to(again / "s4")): p.read_text() for p in (again / "s4").rglob("*") if p.is_file()}
    assert got == {k: v for k, v in files.items() if not k.startswith("checkpoints")}
    assert not (again / "s8").exists()
