"""Pick the decode kernel's launch for one head_dim from a bench_paged_decode_kernel --sweep file (session 38's sweep:
block, warps, stages and the register cap maxnreg), and write a copy of the tree with DECODE_LAUNCH[head_dim] and
DECODE_MAXNREG[head_dim] set to it, for an A/B serving run in the same device call.

    python pick_decode_launch.py SWEEP_JSON SRC_TREE DST_TREE CHOICE_JSON

As session 20's picker: only sweep rows at the split factor the launcher would choose count (the launch table holds
no split), a config's score is its summed ms over the sweep's points, and one with an error above 2e-2 against SDPA
never counts. DST_TREE is written only when the best config is not the default; exit 0 either way.
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
        key = (r["pages_per_iter"] * row["page_size"], r["num_warps"], r["num_stages"], r.get("maxnreg"))
        scores[key] += r["ms"]
        points[key] += 1
n = len(report["results"])
complete = {k: v for k, v in scores.items() if points[k] == n}
path = Path(src) / "fms/triton/paged_decode.py"
text = path.read_text()
launch = tuple(int(x) for x in re.search(rf"\n    {head_dim}: \((\d+), (\d+), (\d+)\),", text).groups())
cap = re.search(r"\nDECODE_MAXNREG: dict\[int, int\] = \{(.*?)\}\n", text, re.S)
assert cap is not None, "DECODE_MAXNREG not found"
caps = {int(k): int(v) for k, v in re.findall(r"(\d+): (\d+)", cap.group(1))}
current = launch + (caps.get(head_dim),)
best = min(complete, key=complete.get)
choice = dict(head_dim=head_dim, default=current, default_ms=complete.get(current), best=best, best_ms=complete[best],
              points=n, scores={str(k): v for k, v in sorted(complete.items(), key=lambda kv: kv[1])})
if best != current:
    shutil.copytree(src, dst, dirs_exist_ok=False)
    out = Path(dst) / "fms/triton/paged_decode.py"
    new = text.replace(f"\n    {head_dim}: {launch},", f"\n    {head_dim}: {best[:3]},", 1)
    assert f"    {head_dim}: {best[:3]}," in new, "the DECODE_LAUNCH entry was not rewritten"
    caps = {k: v for k, v in caps.items() if k != head_dim}
    if best[3] is not None:
        caps[head_dim] = best[3]
    new = new.replace(cap.group(0), "\nDECODE_MAXNREG: dict[int, int] = {" + ", ".join(
        f"{k}: {v}" for k, v in sorted(caps.items())) + "}\n", 1)
    out.write_text(new)
    tag = f"+decode{head_dim}={'-'.join(map(str, best))}"
    (Path(dst) / "COMMIT").write_text((Path(src) / "COMMIT").read_text().strip() + tag + "\n")
    choice["tree"] = dst
Path(choice_path).write_text(json.dumps(choice, indent=1))
print(json.dumps({k: v for k, v in choice.items() if k != "scores"}))
print("top 8:", list(choice["scores"].items())[:8])
