"""The disk's read rate for a checkpoint's files, with no model and no GPU: the ceiling a cold load can reach.

Each pass drops the files from the page cache (bench_startup's evict_page_cache), then reads every file in 64 MB
os.preadv calls into a reused buffer, on 1, 4 and 16 threads (the files' chunks dealt out round-robin). GB/s =
bytes / wall seconds. Run from a tree holding fms (for the eviction):

    python final_project/results/session30/disk_read.py OUT.json /tmp/ckpt_ab/llama-3.1-8b [--threads 1,4,16]
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 64 << 20


def read_all(paths: list[Path], threads: int) -> int:
    jobs = [(p, off, min(CHUNK, p.stat().st_size - off)) for p in paths for off in range(0, p.stat().st_size, CHUNK)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    buffers = [bytearray(CHUNK) for _ in range(threads)]

    def worker(i: int) -> int:
        got = 0
        view = memoryview(buffers[i])
        for p, off, n in jobs[i::threads]:
            got += os.preadv(fds[p], [view[:n]], off)
        return got

    try:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(worker, range(threads)))
    finally:
        for fd in fds.values():
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("folder")
    parser.add_argument("--threads", default="1,4,16")
    args = parser.parse_args()
    from fms.bench.startup import evict_page_cache, page_cache_fraction

    paths = sorted(Path(args.folder).glob("*.safetensors"))
    if not paths:
        sys.exit(f"no *.safetensors files in {args.folder}")
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "folder": args.folder,
              "bytes": sum(p.stat().st_size for p in paths), "runs": []}
    for threads in (int(t) for t in args.threads.split(",")):
        for cache in ("cold", "warm"):
            dropped = evict_page_cache(paths) if cache == "cold" else None
            cached = page_cache_fraction(paths)
            start = time.perf_counter()
            nbytes = read_all(paths, threads)
            wall = time.perf_counter() - start
            row = {"threads": threads, "cache": cache, "dropped": dropped, "page_cached_at_start": cached,
                   "bytes": nbytes, "wall_s": wall, "gb_per_s": nbytes / wall / 1e9}
            report["runs"].append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
