"""Print one line per row of a families benchmark JSON lines file (benchmarks/families.py --out), for the GPU call
scripts' logs:   python3 tools/families_summary.py $OUT/families.jsonl"""
import json
import os
import sys

path = sys.argv[1]
for line in (open(path) if os.path.exists(path) else []):
    r = json.loads(line)
    print(r["shape"][:8], r["mask"], r["tile"], "dens %.3f" % r["density"],
          "cudnn %.1f/%s" % (r["cudnn_fwd_ms"], r.get("cudnn_fwdbwd_ms")), "reord %.2f" % r["reorder_ms"],
          "ours %s/%s flex %s/%s" % (r.get("ours_fwd_ms"), r.get("ours_fwdbwd_ms"), r.get("flex_fwd_ms"), r.get("flex_fwdbwd_ms")),
          "kept/cudnn %.2f" % r.get("kept_tflops_over_cudnn_fwd", 0), r.get("ours_error", "")[:80], r.get("flex_error", "")[:80])
