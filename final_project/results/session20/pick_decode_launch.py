"""Pick the decode kernel's launch for head_dim 64 from a bench_paged_decode_kernel --sweep file, and write a copy of
the tree with DECODE_LAUNCH[64] set to it (for an A/B serving run in the same device call).

    python pick_decode_launch.py SWEEP_JSON SRC_TREE DST_TREE CHOICE_JSON

Only sweep rows at the split factor the launcher would choose count (the launch table holds no split). A config's
score is its summed ms over the sweep's points; the default's score comes from the same sweep's rows at the default
launch. DST_TREE is written only when the best config is not the default; exit 0 either way, CHOICE_JSON says which.
"""

import json
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

sweep_path, src, dst, choice_path = sys.argv[1:5]
report = json.loads(Path(sweep_path).read_text())
head_dim = report["shape"]["head_dim"]
scores, points = defaultdict(float), defaultdict(int)
for row in report["results"]:
    for r in row["sweep"]:
        if r["num_splits"] != row["num_splits"] or r["max_err"] > 2e-2:
            continue
        key = (r["pages_per_iter"] * row["page_size"], r["num_warps"], r["num_stages"])
        scores[key] += r["ms"]
        points[key] += 1
n = len(report["results"])
complete = {k: v for k, v in scores.items() if points[k] == n}
src_text = (Path(src) / "fms/triton/paged_decode.py").read_text()
current = tuple(int(x) for x in re.search(rf"\n    {head_dim}: \((\d+), (\d+), (\d+)\),", src_text).groups())
best = min(complete, key=complete.get)
choice = dict(head_dim=head_dim, default=current, default_ms=complete.get(current), best=best, best_ms=complete[best],
              points=n, scores={str(k): v for k, v in sorted(complete.items(), key=lambda kv: kv[1])})
if best != current:
    shutil.copytree(src, dst, dirs_exist_ok=False)
    path = Path(dst) / "fms/triton/paged_decode.py"
    text = path.read_text().replace(f"\n    {head_dim}: {current},", f"\n    {head_dim}: {best},", 1)
    assert f"    {head_dim}: {best}," in text, "the table entry was not rewritten"
    path.write_text(text)
    (Path(dst) / "COMMIT").write_text((Path(src) / "COMMIT").read_text().strip() + f"+decode{head_dim}={'-'.join(map(str, best))}\n")
    choice["tree"] = dst
Path(choice_path).write_text(json.dumps(choice, indent=1))
print(json.dumps({k: v for k, v in choice.items() if k != "scores"}))
print("top 8:", list(choice["scores"].items())[:8])
