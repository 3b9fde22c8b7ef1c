"""Print one line per calibration-benchmark row of a JSON lines file (benchmarks/calibration.py --json), for the
GPU call scripts' logs:   python3 tools/calib_summary.py $OUT/calib.jsonl"""
import json
import os
import sys

path = sys.argv[1]
for line in (open(path) if os.path.exists(path) else []):
    r = json.loads(line)
    if "sweep" in r:
        continue
    print(r["device"], r["shape"][:16].ljust(16), (r["kernel"] or "-").ljust(7),
          "obs %.2f ms kern %s host %s sdpa %.2f obs/sdpa %.2f kern/sdpa %s mem %s verify %s ms (%sx, mem %s)"
          % (r["observe_ms"], r["kernel_ms"], r["host_ms"], r["sdpa_bf16_ms"], r["observe_over_sdpa"],
             r["kernel_over_sdpa"], r["extra_memory_over_sdpa_working_set"], r.get("verify_ms"),
             r.get("verify_over_sdpa"), r.get("verify_extra_memory_over_sdpa_working_set")))
