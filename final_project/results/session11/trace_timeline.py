"""Timeline of one traced server run (session 11's diagnostic; the tree is .gpu + trace.patch): for the last timed run,
each event's first / median / last time in ms after the first request was sent. Usage: trace_timeline.py TRACE_PREFIX
SERVER_VS_OFFLINE_JSON. Events: send / client_first (client), handler / submitted / first_sse (the HTTP event loop),
pipe_send (adds sent to the engine process), engine_add / engine_first / publish (engine process), reader_first (the
HTTP process's reader thread got the request's first token)."""
import collections
import glob
import json
import sys

prefix, summary = sys.argv[1], sys.argv[2]
n = json.load(open(summary))["workload"]["num_prompts"]
events = []
for name in (n for n in glob.glob(prefix + ".*") if not n.endswith(".json")):
    for line in open(name):
        parts = line.split()
        if len(parts) == 3:  # a line two threads wrote into at once is skipped
            events.append((float(parts[0]), parts[1]))
events.sort()
t0 = [t for t, w in events if w == "send"][-n]
by = collections.defaultdict(list)
for t, w in events:
    if t >= t0 - 1e-3:
        by[w].append(1e3 * (t - t0))
order = ["send", "handler", "submitted", "pipe_send", "engine_add", "engine_first", "publish", "reader_first",
         "first_sse", "client_first"]
print("| event | count | first ms | median ms | last ms |\n|---|---|---|---|---|")
for w in order:
    ts = sorted(by.get(w, []))
    if ts:
        print(f"| {w} | {len(ts)} | {ts[0]:.1f} | {ts[len(ts) // 2]:.1f} | {ts[-1]:.1f} |")
