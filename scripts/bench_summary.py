"""Summarises scripts/bench.sh's raw results as markdown: min/median/max over
runs for every case, against the targets (BENCHMARKS.md says which case is
which)."""

import statistics
import sys
from collections import defaultdict


def parse(path):
    header, rows = [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("#"):
                header.append(line.lstrip("# "))
            elif line:
                rows.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return header, rows


def spread(values, fmt):
    values = sorted(v for v in values if v is not None)
    if not values:
        return "-"
    return "/".join(fmt.format(v) for v in (values[0], statistics.median(values), values[-1]))


def floats(rs, key):
    return [float(r[key]) for r in rs if r.get(key)]


def ratios(rs):
    return [float(r["posts_per_s"]) / float(r["wrk_per_s"]) for r in rs if r.get("wrk_per_s")]


def of_kind(rows, kind):
    return [r for r in rows if r.get("kind") == kind]


def grouped(rs, key):
    """The rows by key(row), groups and their rows in the order read."""
    groups = defaultdict(list)
    for r in rs:
        groups[key(r)].append(r)
    return groups


def table(columns, lines):
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def verdict(ok):
    return "yes" if ok else "**no**"


def process_section(rows):
    rs = of_kind(rows, "process")
    if not rs:
        return []
    groups = grouped(rs, lambda r: (r["mode"], int(r["rows"]), r["rate_kind"], r["rate"]))
    lines, peers = [], []
    order = {"free": 0, "off": 1, "bound": 2}
    for (mode, n, kind, rate), g in sorted(groups.items(), key=lambda kv: (order.get(kv[0][2], 3), kv[0][0], kv[0][1])):
        label = {"free": f"{int(rate):,}/s (not binding)", "off": "0 (no limiter)"}.get(kind, f"{int(rate):,}/s (binding)")
        lines.append([
            mode, f"{n:,}", label, str(len(g)),
            spread(floats(g, "posts_per_s"), "{:.0f}"), spread(floats(g, "wrk_per_s"), "{:.0f}"),
            spread(ratios(g), "{:.2f}"), spread(floats(g, "cpu_us_per_post"), "{:.1f}"),
            spread([1e6 / v for v in floats(g, "cpu_us_per_post")], "{:.0f}"),
            spread(floats(g, "peak_rss_mb"), "{:.1f}"), spread(floats(g, "process_wall_s"), "{:.2f}"),
        ])
        if all(r.get("sink_cpu_s") for r in g):
            # Per post, what the sink's core spent: the sink itself, and
            # dynalite scanning and deleting (moto only at the start and end).
            per = lambda key: [1e6 * float(r[key]) / float(r["posts"]) for r in g]  # noqa: E731
            # The most posts/s the sink's core could serve at what its
            # peers spent per post in that run; and the ratio to wrk that
            # allows, since wrk has that core for the sink alone.
            ceiling = [1e6 * float(r["posts"]) / sum(1e6 * float(r[k]) for k in ("sink_cpu_s", "dynalite_cpu_s",
                                                                                  "moto_cpu_s"))
                       for r in g]
            reached = [float(r["posts_per_s"]) / c for r, c in zip(g, ceiling)]
            allows = [c / float(r["wrk_per_s"]) for r, c in zip(g, ceiling) if r.get("wrk_per_s")]
            peers.append([
                mode, f"{n:,}", label,
                spread(per("sink_cpu_s"), "{:.1f}"), spread(per("dynalite_cpu_s"), "{:.1f}"),
                spread(per("moto_cpu_s"), "{:.2f}"),
                spread(floats(g, "worker_core_busy"), "{:.2f}"), spread(floats(g, "sink_core_busy"), "{:.2f}"),
                spread([100 * float(r["steal"]) for r in g], "{:.1f}"),
                spread(ceiling, "{:.0f}"), spread(reached, "{:.2f}"), spread(allows, "{:.2f}"),
            ])
    out = ["## Production path: `fanout run` as a process (SQS job on moto, audience scanned from dynalite)", "",
           table(["transport", "rows", "rate", "runs", "posts/s", "wrk posts/s", "ratio", "CPU µs/post (process)",
                  "posts/CPU-s", "peak RSS MB", "process wall s"], lines), ""]
    if peers:
        out += ["Where the sink's core went during the same runs (CPU µs per post of each peer; each core's busy "
                "share and the hypervisor's steal over the process's wall time, start-up and idle exit included):",
                "", table(["transport", "rows", "rate", "sink µs/post", "dynalite µs/post", "moto µs/post",
                           "worker core busy", "sink core busy", "steal %", "posts/s the sink's core allows",
                           "reached of it", "ratio to wrk it allows"], peers), ""]
    bad = [r for r in rs if int(r.get("failed", 0)) or int(r.get("retries", 0))]
    if bad:
        out.append(f"- note: {len(bad)} run(s) with failed or retried sends")
    checks = []
    main = groups.get(("plain", 20000, "free", next((k[3] for k in groups if k[:3] == ("plain", 20000, "free")), "")))
    if main:
        ratio = statistics.median(ratios(main)) if ratios(main) else 0
        per_cpu = statistics.median([1e6 / v for v in floats(main, "cpu_us_per_post")])
        rss = statistics.median(floats(main, "peak_rss_mb"))
        checks += [
            f"- ≥ 0.4 of wrk (20,000 rows, rate not binding, plain, median): {ratio:.2f} — {verdict(ratio >= 0.4)}",
            f"- ≥ 40,000 posts per CPU-second (median): {per_cpu:.0f} — {verdict(per_cpu >= 40000)}",
            f"- peak RSS ≤ 32 MB (median): {rss:.1f} MB — {verdict(rss <= 32)}",
        ]
        sizes = sorted(n for (m, n, k, _) in groups if m == "plain" and k == "free")
        if len(sizes) >= 2:
            big = next(g for (m, n, k, _), g in groups.items() if m == "plain" and k == "free" and n == sizes[-1])
            growth = statistics.median(floats(big, "peak_rss_mb")) / rss
            checks.append(f"- peak RSS {sizes[-1]:,} vs {sizes[0]:,} rows: {growth:.2f}× (target ≤ 1.25×) — "
                          f"{verdict(growth <= 1.25)}")
    off = next((g for (m, n, k, _), g in groups.items() if (m, n, k) == ("plain", 20000, "off")), None)
    if main and off:
        with_rate = statistics.median(floats(main, "cpu_us_per_post"))
        without = statistics.median(floats(off, "cpu_us_per_post"))
        checks.append(f"- a rate set costs ≤ 10 % more CPU per post than none (20,000 rows, medians): "
                      f"{with_rate:.1f} against {without:.1f} µs ({100 * (with_rate / without - 1):+.0f} %) — "
                      f"{verdict(with_rate <= 1.1 * without)}; ratio to wrk with no limiter "
                      f"{statistics.median(ratios(off)):.2f}")
    for (mode, n, kind, rate), g in groups.items():
        if kind == "bound":
            errors = [100 * (v - float(rate)) / float(rate) for v in floats(g, "posts_per_s")]
            # Below the rate by more than 3 %, the run could not go faster
            # (the machine, dynalite): the limit did not bind, nothing to judge.
            held = [e for e in errors if e >= -3]
            checks.append(f"- rate {int(rate):,}/s ({mode}, {n:,} rows): achieved {spread(errors, '{:+.2f}')} % from it "
                          f"over the job; within ±3 % where it bound ({len(held)} of {len(errors)} runs): "
                          f"{verdict(all(abs(e) <= 3 for e in held)) if held else 'not measured, never bound'}; "
                          f"never above it by > 3 %: {verdict(all(e <= 3 for e in errors))}; "
                          f"peak RSS {spread(floats(g, 'peak_rss_mb'), '{:.1f}')} MB")
    return out + checks + [""]


def jobs_section(rows):
    rs = of_kind(rows, "jobs")
    if not rs:
        return []
    groups = grouped(rs, lambda r: (int(r["latency_ms"]), int(r["max_concurrent_jobs"]), r["slots"],
                                    int(r.get("huge", 0)), int(r.get("durable", 0))))
    lines = []
    for (latency, slots, how, huge, durable), g in sorted(groups.items()):
        calls = [float(r["run_table_calls"]) / float(r["jobs"]) for r in g if r.get("run_table_calls")]
        lines.append([
            f"{latency} ms", f"{slots}{' (default)' if how == 'default' else ''}",
            f"{huge:,}" if huge else "-",
            f"yes, {spread(calls, '{:.1f}')} calls a job" if durable else "no", str(len(g)),
            spread(floats(g, "jobs_per_s"), "{:.0f}"), spread(floats(g, "posts_per_s"), "{:.0f}"),
            # Beside a broadcast, the CPU is mostly the broadcast's.
            "-" if huge else spread(floats(g, "cpu_us_per_job"), "{:.0f}"),
            spread(floats(g, "peak_rss_mb"), "{:.1f}"),
        ])
    first = rs[0]
    out = [f"## Many small broadcasts: {first['jobs']} channel jobs of {first['audience']} connections, "
           f"rate {int(first['rate']):,}/s (in-process queue and audiences, real worker loop and lean path)", "",
           table(["added to every AWS call", "max_concurrent_jobs", "beside a broadcast of", "runs recorded", "runs",
                  "small jobs/s", "posts/s (all)", "CPU µs/small job", "peak RSS MB"], lines), ""]
    rate = float(first["rate"])
    for (latency, slots, how, huge, durable), g in sorted(groups.items()):
        if huge:
            errors = [100 * (v - rate) / rate for v in floats(g, "posts_per_s")]
            rss = max(floats(g, "peak_rss_mb"))
            out.append(f"- beside a {huge:,}-connection broadcast: posts/s {spread(errors, '{:+.2f}')} % from the "
                       f"{rate:.0f}/s rate (never above it by > 3 %: {verdict(all(e <= 3 for e in errors))}), "
                       f"peak RSS ≤ 32 MB: {verdict(rss <= 32)}")
        elif latency == 10 and how == "default":
            median = statistics.median(floats(g, "jobs_per_s"))
            what = "runs recorded, as the template deploys it" if durable else "default configuration"
            out.append(f"- ≥ 500 jobs/s with 10 ms per AWS call, {what} (median): {median:.0f} — "
                       f"{verdict(median >= 500)}")
    return out + [""]


def engine_section(rows):
    groups = grouped(of_kind(rows, "broadcast"), lambda r: (int(r["connections"]), r["store"], r["path"]))
    out = []
    if groups:
        lines = []
        for (n, store, p), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "Dynamo", kv[0][2])):
            lines.append([
                f"{n:,}", "table" if store == "Dynamo" else "generated", p.lower(), str(len(g)),
                spread(floats(g, "posts_per_s"), "{:.0f}"), spread(floats(g, "cpu_us_per_post"), "{:.1f}"),
                spread([1e6 / v for v in floats(g, "cpu_us_per_post")], "{:.0f}"),
                spread(floats(g, "peak_rss_mb"), "{:.1f}"), spread(floats(g, "wrk_per_s"), "{:.0f}"),
                spread(ratios(g), "{:.2f}"),
            ])
        out += ["## Engine only (example binary `bench broadcast`, rate off): a breakdown, not the product", "",
                table(["N", "audience", "path", "runs", "posts/s", "CPU µs/post", "posts/CPU-s", "peak RSS MB",
                       "wrk posts/s", "ratio"], lines), ""]

    limiter = of_kind(rows, "limiter")
    if limiter:
        rate = float(limiter[0]["rate"])
        achieved = floats(limiter, "posts_per_s")
        errors = [100 * (a - rate) / rate for a in achieved]
        out.append(f"- engine rate limiter at {rate:.0f}/s over {float(limiter[0]['secs']):.1f} s: "
                   f"{spread(achieved, '{:.0f}')} posts/s, error {spread(errors, '{:+.2f}')} % (target within ±3 %), "
                   f"CPU {spread(floats(limiter, 'cpu_us_per_post'), '{:.1f}')} µs/post")
    split = grouped(of_kind(rows, "split"), lambda r: int(r["jobs"]))
    for jobs, g in sorted(split.items()):
        out.append(f"- {int(g[0]['connections']):,} connections as {jobs} job(s), unpinned: "
                   f"{spread(floats(g, 'posts_per_s'), '{:.0f}')} posts/s, "
                   f"{spread(floats(g, 'cpu_us_per_post'), '{:.1f}')} CPU µs/post, "
                   f"cores busy {spread(floats(g, 'cores_busy'), '{:.2f}')}")
    latency = grouped(of_kind(rows, "latency"), lambda r: r["path"])
    for p, g in sorted(latency.items()):
        jobs = sum(int(r["jobs"]) for r in g)
        out.append(f"- SQS → first delivery, {p.lower()} ({jobs} jobs in {len(g)} runs): "
                   f"min {min(floats(g, 'min_ms')):.1f} ms, run medians {spread(floats(g, 'median_ms'), '{:.1f}')} ms, "
                   f"max {max(floats(g, 'max_ms')):.1f} ms (target < 50 ms)")
    return out + [""] if out else []


def fleet_section(rows):
    rs = of_kind(rows, "fleet")
    if not rs:
        return []
    groups = grouped(rs, lambda r: int(r["workers"]))
    rate = float(rs[0]["fleet_rate"])
    lines = []
    for workers, g in sorted(groups.items()):
        spans = [float(r["span_s"]) / float(r["ideal_s"]) for r in g]
        lines.append([
            str(workers), str(len(g)), spread(floats(g, "rate_per_s"), "{:.0f}"),
            spread(floats(g, "least_per_s"), "{:.0f}") + " .. " + spread(floats(g, "most_per_s"), "{:.0f}"),
            spread(floats(g, "span_s"), "{:.1f}") + f" s (ideal {float(g[0]['ideal_s']):.0f} s)",
            spread(spans, "{:.2f}"), spread(floats(g, "again"), "{:.0f}"),
        ])
    out = [f"## Fleet budget: {int(rate):,}/s shared by 1, 2 and 4 `fanout run` processes "
           f"({int(rs[0]['connections']):,} connections)", "",
           table(["workers", "runs", "rate at the endpoint /s", "its seconds, least .. most",
                  "broadcast took", "× ideal", "delivered twice"], lines), ""]
    means = floats(rs, "rate_per_s")
    alone = floats(groups.get(1, []), "rate_per_s")
    spans = [float(r["span_s"]) / float(r["ideal_s"]) for r in rs]
    out.append(f"- within ±5 % of {rate:.0f}/s once all have run 2 s, every run: "
               f"{verdict(all(abs(m - rate) <= 0.05 * rate for m in means))}")
    if alone:
        out.append(f"- one worker alone ≥ 95 % of the fleet rate: {verdict(min(alone) >= 0.95 * rate)}")
    out.append(f"- broadcast within 1.1 × the ideal N ÷ rate, every run: {verdict(all(x <= 1.1 for x in spans))}")
    kills = of_kind(rows, "fleet_kill")
    if kills:
        took = floats(kills, "recovered_s")
        out.append(f"- one of four killed: the fleet's rate again after {spread(took, '{:.1f}')} s "
                   f"(the first whole second at ≥ 95 %; target 5 s, whole seconds add up to 1)")
    return out + [""] + mixed_section(rows)


def mixed_section(rows):
    rs = of_kind(rows, "fleet_mixed")
    if not rs:
        return []
    r0 = rs[0]
    room = float(r0["fleet_rate"]) - float(r0["small_per_s"])
    lines = [[str(len(rs)), spread(floats(rs, "broadcast_per_s"), "{:,.0f}"),
              spread(floats(rs, "of_room"), "{:.3f}"),
              spread(floats(rs, "span_s"), "{:.1f}") + f" s (ideal {float(r0['ideal_s']):.1f} s)",
              spread(floats(rs, "small_first_median_ms"), "{:.0f}") + " / "
              + spread(floats(rs, "small_first_max_ms"), "{:.0f}"),
              spread(floats(rs, "beside_first_median_ms"), "{:.0f}") + " / "
              + spread(floats(rs, "beside_first_max_ms"), "{:.0f}"),
              spread(floats(rs, "again"), "{:.0f}")]]
    out = [f"## Mixed fleet: one unsplit broadcast beside small jobs ({int(float(r0['fleet_rate'])):,}/s, "
           f"3 workers, {int(r0['connections']):,} connections, {float(r0['small_per_s']):.0f} small posts/s)", "",
           table(["runs", "broadcast posts/s", "÷ (fleet rate − small jobs' rate)", "broadcast took",
                  "small jobs SQS → first delivery, median / max ms (all)",
                  "the same, sent while the broadcast ran", "delivered twice"], lines), "",
           f"- the broadcast at ≥ 0.85 × {room:,.0f}/s, every run: "
           f"{verdict(min(floats(rs, 'of_room')) >= 0.85)}"]
    missed = of_kind(rows, "fleet_missed")
    if missed:
        out.append(f"- runs in which the fleet test missed one of its timing targets: {len(missed)} of {len(rs)}")
    return out + [""]


def latest_section(rows):
    rs = of_kind(rows, "latest")
    if not rs:
        return []
    r0 = rs[0]
    modes = grouped(rs, lambda r: r["mode"])

    def waits(g):
        # The last update's send to every connection having it; "never"
        # when some connection did not by the end.
        done = [float(r["last_to_all_ms"]) for r in g if r["last_to_all_ms"] != "never"]
        never = len(g) - len(done)
        if not done:
            return "never"
        cell = spread(done, "{:,.0f}") + " ms"
        return f"{cell} ({never} never)" if never else cell

    lines = []
    for mode in ("latest", "plain"):
        g = modes.get(mode, [])
        if not g:
            continue
        lines.append([
            f"`{mode}`" if mode == "latest" else "without `latest`", str(len(g)),
            spread(floats(g, "stale_over_5s"), "{:,.0f}"), spread(floats(g, "no_update"), "{:,.0f}"),
            waits(g), spread(floats(g, "behind_over_5s"), "{:,.0f}"),
            spread(floats(g, "behind_max_ms"), "{:,.0f}"), spread(floats(g, "have_last"), "{:,.0f}"),
            spread(floats(g, "updates_median"), "{:.0f}"), spread(floats(g, "posts_per_s"), "{:,.0f}"),
            spread(floats(g, "span_s"), "{:.1f}"),
        ])
    n = int(r0["connections"])
    out = [f"## Newer value wins: {int(r0['updates'])} updates to one key, one every {r0['every_ms']} ms, "
           f"to a channel of {n:,} connections ({int(r0['fleet_rate']):,}/s, {r0['workers']} workers)", "",
           table(["jobs", "runs", f"connections ever > 5 s without the newest (of {n:,})", "with no update",
                  "last update's send → every connection has it", "> 5 s before an update (or a newer one) came",
                  "longest such wait, ms", "hold the last update at the end", "updates a connection got (median)",
                  "posts/s at the gateway while updates were sent", "measured for, s"], lines), ""]
    for mode, g in modes.items():
        statuses = sorted({r.get("statuses", "") for r in g})
        out.append(f"- {mode}: broadcast reports by status, per run: {'; '.join(statuses) or '-'}")
        spans = [r["kept_up_span"] for r in g if "kept_up_span" in r]
        if spans:
            out.append(f"- {mode}: where the connections that never waited over 5 s are in the channel's "
                       f"order (first..last), per run: {', '.join(spans)}")
    failed = of_kind(rows, "latest_failed")
    if failed:
        out.append(f"- runs whose checks failed (with `latest`, every connection ends with the last update): "
                   f"{len(failed)} of {len(modes.get('latest', []))}")
    return out + [""]


def cancel_section(rows):
    rs = of_kind(rows, "cancel")
    missed = of_kind(rows, "cancel_missed")
    if not rs and not missed:
        return []
    out = []
    if rs:
        r0 = rs[0]
        n = int(r0["connections"])
        lines = [[str(len(rs)), spread(floats(rs, "cancel_to_last_post_ms"), "{:.0f}"),
                  spread(floats(rs, "cancel_recorded_ms"), "{:.0f}"),
                  spread(floats(rs, "recorded_to_last_post_ms"), "{:.0f}"),
                  spread(floats(rs, "posts_after_cancel"), "{:,.0f}"),
                  spread(floats(rs, "cancel_at"), "{:,.0f}"),
                  spread(floats(rs, "posts"), "{:,.0f}") + f" of {n:,}",
                  spread(floats(rs, "reports_ms"), "{:.0f}")]]
        out += [f"## Cancel mid-way: a {n:,}-connection broadcast split over {r0['segments']} segment jobs on "
                f"{r0['workers']} `fanout run` processes (fleet rate {int(r0['fleet_rate']):,}/s, "
                f"max_concurrent_jobs {r0['max_concurrent_jobs']})", "",
                table(["runs", "cancel's send → last post, ms", "→ tombstone recorded, ms",
                       "tombstone → last post, ms", "posts after the send", "posted when sent",
                       "posted in all", "→ every segment's report, ms"], lines), ""]
        stops = floats(rs, "cancel_to_last_post_ms")
        settled = [r["statuses"] == ",".join(["cancelled"] * int(r["segments"]))
                   and r["final"] == ",".join(["true"] * int(r["segments"])) for r in rs]
        out += [f"- the last post within 3,000 ms of the cancel's send, every run: "
                f"{verdict(max(stops) <= 3000)}",
                f"- every segment's run `cancelled`, final, every run: {verdict(all(settled))}",
                f"- posts that landed but count as `unsent` in the reports (in flight when the runs stopped): "
                f"{spread(floats(rs, 'landed_unreported'), '{:.0f}')}",
                "- segments stopped per task (each run): " + "; ".join(r["stopped_per_task"] for r in rs)]
    if missed:
        out.append(f"- runs in which the cancel test failed or missed its target: {len(missed)}")
    return out + [""]


def throttle_section(rows):
    converge = [r for r in rows if r.get("kind") == "throttle" and r.get("case") == "converge"]
    slow = [r for r in rows if r.get("kind") == "throttle" and r.get("case") == "slow_client"]
    if not converge and not slow:
        return []
    out = ["## A throttling endpoint (the `missed_clients` test, release)", ""]
    if converge:
        accepted = float(converge[0]["accepted_per_s"])
        rates = floats(converge, "rate_per_s")
        shares = [100 * x for x in floats(converge, "throttled_share")]
        out.append(f"- a token bucket accepting {accepted:.0f}/s: delivered at {spread(rates, '{:.0f}')}/s "
                   f"(target ≥ 90 %: {verdict(min(rates) >= 0.9 * accepted)}), "
                   f"{spread(shares, '{:.2f}')} % of posts throttled (target ≤ 10 %: "
                   f"{verdict(max(shares) <= 10)})")
    if slow:
        ceiling = float(slow[0]["ceiling_per_s"])
        rates = floats(slow, "rate_per_s")
        out.append(f"- one client answering only 429 under a {ceiling:.0f}/s ceiling: the others at "
                   f"{spread(rates, '{:.0f}')}/s (target ≥ 90 % of the ceiling: "
                   f"{verdict(min(rates) >= 0.9 * ceiling)})")
    return out + [""]


def index_section(rows):
    rs = of_kind(rows, "index")
    if not rs:
        return []
    r0 = rs[0]
    out = ["## A broadcast to everyone through the connection index (dynalite)", "",
           f"{r0['connections']} connections in two channels each ({r0['rows']} rows), read "
           "through an index keyed by the connection id: each connection is posted to once.", ""]
    lines = [[str(len(rs)), spread(floats(rs, "posts"), "{:.0f}"), spread(floats(rs, "posts_per_s"), "{:,.0f}"),
              spread(floats(rs, "cpu_us_per_post"), "{:.1f}"), spread(floats(rs, "peak_rss_mb"), "{:.1f}")]]
    out.append(table(["runs", "posts", "posts/s", "CPU µs/post", "peak RSS MB"], lines))
    return out + [""]


def removals_section(rows):
    groups = grouped(of_kind(rows, "removals"), lambda r: r["layout"])
    if not groups:
        return []
    out = ["## Removing gone rows (dynalite)", "",
           "by-id-batch: a table keyed by the connection id, 25 rows a BatchWriteItem; "
           "by-user-conditional: a table keyed by user, one DeleteItem a row on condition "
           "that it still holds the id and start.", ""]
    lines = [[layout, str(len(g)), spread(floats(g, "wall_us_per_row"), "{:.1f}"),
              spread(floats(g, "cpu_us_per_row"), "{:.1f}")] for layout, g in sorted(groups.items())]
    out.append(table(["layout", "runs", "wall µs/row", "fanout CPU µs/row"], lines))
    return out + [""]


def main(path):
    header, rows = parse(path)
    out = ["# fanout benchmark summary", "", *[f"- {h}" for h in header], "",
           "Each cell: min/median/max over runs. posts/CPU-s = 10⁶ / (CPU µs per post).", ""]
    out += (process_section(rows) + jobs_section(rows) + fleet_section(rows) + cancel_section(rows)
            + latest_section(rows) + throttle_section(rows)
            + engine_section(rows)
            + removals_section(rows) + index_section(rows))
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
