"""How the block-mass error estimate relates to the real output error, on the embedded model (CPU).

    python benchmarks/calibration_estimate.py [--budgets 0.05,0.1] [--json out.jsonl]

Calibrates the embedded model on the demo's calibration prompt (4 steps) with every family; each site feeds
both an exact calibrator (real relative L2 output error of every candidate) and a block-mass one (the
estimate: root mean square of the softmax mass a query row drops). Reports, over every (site, head,
candidate) with a non-zero estimate, the ratio real / estimate, and per budget the mean density of the
masks chosen (a) by the exact errors and (b) by the estimate followed by the exact verification of the
chosen candidate and its denser fallbacks (what calibration on GPU does), with their worst real error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.calibration import ALL, write_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.05,0.1")
    ap.add_argument("--json", default=None)
    ap.add_argument("--every", action=argparse.BooleanOptionalAction, default=True,
                    help="verify every candidate (the default), or only the estimate's pre-selection (--no-every)")
    args = ap.parse_args()

    import vdit_compile
    from vdit_compile.calibration import capture_transformer_inputs
    from vdit_compile.calibration.collector import SiteCalibrator
    from vdit_compile.eval.demo import CALIB_OFFSET
    from vdit_compile.eval.prompts import prompt_set
    from vdit_compile.models.embedded import load_pipeline

    pipe = load_pipeline(device="cpu")
    inputs = capture_transformer_inputs(pipe, prompt_set(1, CALIB_OFFSET).prompts, num_inference_steps=4, device=None,
                                        progress=False)
    twins: dict[str, SiteCalibrator] = {}
    exact: dict[str, SiteCalibrator] = {}
    original = SiteCalibrator.observe

    def observe(self, q, k, v, scale=None, padding_cut=False, timestep=None):  # feed a block-mass twin too
        if self.method == "exact" and self._verify is None and self not in twins.values():
            tw = twins.get(self.name)
            if tw is None:
                tw = twins[self.name] = SiteCalibrator(self.name, self.layout, self.num_heads, self.candidates,
                                                       method="mass")
                exact[self.name] = self
            original(tw, q, k, v, scale, padding_cut, timestep)
        return original(self, q, k, v, scale, padding_cut, timestep)

    SiteCalibrator.observe = observe  # put back below
    try:
        vdit_compile.optimize(pipe, calib_inputs=inputs, progress=False, families=ALL)
    finally:
        SiteCalibrator.observe = original
        vdit_compile.restore(pipe)
    real, est = [], []
    for name, ex in exact.items():
        e_real, e_est = ex.candidate_errors(), twins[name].candidate_errors(verified=False)
        ok = e_est > 1e-6
        real.append(e_real[ok])
        est.append(e_est[ok])
    real, est = torch.cat(real), torch.cat(est)
    ratio = real / est
    q = torch.quantile(ratio.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    rows = [{"what": "real_over_estimate", "pairs": int(ratio.numel()), "p10": round(q[0], 3), "median": round(q[1], 3),
             "p90": round(q[2], 3), "corr": round(float(torch.corrcoef(torch.stack([real, est]))[0, 1]), 3)}]
    for b in (float(x) for x in args.budgets.split(",")):
        d_exact, d_ver, worst_ver = [], [], 0.0
        for name, ex in exact.items():
            tw = twins[name]
            dens = ex.candidate_densities()
            res = ex.result(b)
            d_exact += res.densities
            verify = tw.begin_verify(b, None, None, every=args.every)
            e_real = ex.candidate_errors()
            for h in range(ex.num_heads):  # the verification pass, emulated with the exact statistics
                ok = [c for c in verify if e_real[h, c] <= b]
                c = min(ok, key=lambda c: (dens[c], c))
                d_ver.append(dens[c])
                worst_ver = max(worst_ver, float(e_real[h, c]))
            tw._verify = None
        rows.append({"what": "plan", "budget": b, "exact_mean_density_tiled_sites": round(sum(d_exact) / len(d_exact), 4),
                     "mass_verified_mean_density": round(sum(d_ver) / len(d_ver), 4),
                     "mass_verified_worst_real_error": round(worst_ver, 4)})
    write_rows(rows, args.json)


if __name__ == "__main__":
    main()
