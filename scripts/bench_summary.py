"""Summarises scripts/bench.sh's raw results: min / median / max over runs,
per audience size and send path, against issue 5's targets."""

import statistics
import sys
from collections import defaultdict


def parse(path):
    header, rows = [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("#"):
                header.append(line)
            elif line:
                rows.append(dict(kv.split("=", 1) for kv in line.split()))
    return header, rows


def spread(values, fmt):
    values = sorted(values)
    if not values:
        return "-"
    return "/".join(fmt.format(v) for v in (values[0], statistics.median(values), values[-1]))


def main(path):
    header, rows = parse(path)
    print("\n".join(header))
    groups = defaultdict(list)
    for r in rows:
        if r["kind"] == "broadcast":
            groups[(int(r["connections"]), r["store"], r["path"])].append(r)

    print("\nmin/median/max over runs")
    columns = [
        ("N", 9), ("audience", 9), ("path", 5), ("runs", 4), ("posts/s", 20), ("CPU µs/post", 20),
        ("posts/CPU-s", 20), ("peak RSS MB", 16), ("wrk posts/s", 20), ("ratio", 16),
    ]
    print("  ".join(name.ljust(width) for name, width in columns))
    peak = {}
    for (n, store, p), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "Dynamo", kv[0][2])):
        f = lambda k: [float(r[k]) for r in rs]
        ratio = [float(r["posts_per_s"]) / float(r["wrk_per_s"]) for r in rs if r.get("wrk_per_s")]
        if store == "Generated":
            peak[(n, p)] = statistics.median(f("peak_rss_mb"))
        cells = [
            str(n), "table" if store == "Dynamo" else "generated", p.lower(), str(len(rs)),
            spread(f("posts_per_s"), "{:.0f}"),
            spread(f("cpu_us_per_post"), "{:.1f}"),
            spread([1e6 / v for v in f("cpu_us_per_post")], "{:.0f}"),
            spread(f("peak_rss_mb"), "{:.1f}"),
            spread(f("wrk_per_s"), "{:.0f}"),
            spread(ratio, "{:.2f}"),
        ]
        print("  ".join(c.ljust(w) for c, (_, w) in zip(cells, columns)))
        bad = [r for r in rs if int(r["failed"]) or int(r["retries"])]
        if bad:
            print(f"  note: {len(bad)} run(s) with failed or retried sends")

    sizes = sorted({n for n, _ in peak})
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        for p in sorted({p for _, p in peak}):
            if (small, p) in peak and (large, p) in peak:
                print(f"peak RSS {large} vs {small} (generated audience), {p.lower()}: "
                      f"{peak[(large, p)] / peak[(small, p)]:.2f}x (target <= 1.25x)")

    limiter = [r for r in rows if r["kind"] == "limiter"]
    if limiter:
        rate = float(limiter[0]["rate"])
        achieved = [float(r["posts_per_s"]) for r in limiter]
        errors = [100 * (a - rate) / rate for a in achieved]
        print(f"rate limiter at {rate:.0f}/s over {float(limiter[0]['secs']):.1f} s: "
              f"{spread(achieved, '{:.0f}')} posts/s, error {spread(errors, '{:+.2f}')} % "
              f"(target within ±3 %)")


    split = defaultdict(list)
    for r in rows:
        if r["kind"] == "split":
            split[int(r["jobs"])].append(r)
    for jobs, rs in sorted(split.items()):
        f = lambda k: [float(r[k]) for r in rs]
        print(f"{rs[0]['connections']} connections as {jobs} job(s), unpinned: "
              f"{spread(f('posts_per_s'), '{:.0f}')} posts/s, "
              f"{spread(f('cpu_us_per_post'), '{:.1f}')} CPU µs/post, "
              f"cores busy {spread(f('cores_busy'), '{:.2f}')}")

    latency = defaultdict(list)
    for r in rows:
        if r["kind"] == "latency":
            latency[r["path"]].append(r)
    for p, rs in sorted(latency.items()):
        jobs = sum(int(r["jobs"]) for r in rs)
        print(f"SQS -> first delivery, {p.lower()} ({jobs} jobs in {len(rs)} runs): "
              f"min {min(float(r['min_ms']) for r in rs):.1f} ms, "
              f"run medians {spread([float(r['median_ms']) for r in rs], '{:.1f}')} ms, "
              f"max {max(float(r['max_ms']) for r in rs):.1f} ms (target < 50 ms)")


if __name__ == "__main__":
    main(sys.argv[1])
