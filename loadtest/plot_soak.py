#!/usr/bin/env python3
"""Renders a soak run's figures: loadtest/plot_soak.py loadtest/results/<run>-soak

Reads nodes.csv (each node's RSS, descriptors, sessions and live heap every 10 s),
timeline*.csv (each generator's live p50/p99 every 10 s) and faults.csv, writes soak.png (RSS
and live heap per node, live p99 over time, faults marked) and prints each node process's RSS
slope and live-heap slope (least squares lines through its samples: flat memory means a slope
near zero) over its steady windows: after its warm-up and before the first fault, and from two
minutes after the last fault to the end of the generators' timelines (samples taken while the
clients leave are not steady). A fault moves memory on purpose (a resubscribe, a node's
clients moving to the others), so the windows leave them out. The live heap (jemalloc's
allocated bytes) is what the program holds: RSS growing while it stays flat is the allocator
keeping pages, not a leak.
"""

import csv
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def slope(points):
    """Least squares slope and intercept of (x, y) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return (sxy / sxx if sxx else 0.0), my


def main(out):
    nodes = rows(os.path.join(out, "nodes.csv"))
    timelines = [rows(p) for p in sorted(glob.glob(os.path.join(out, "timeline*.csv")))]
    faults = rows(os.path.join(out, "faults.csv")) if os.path.exists(os.path.join(out, "faults.csv")) else []
    if not nodes:
        print("soak plot: no node samples")
        return 1
    t0 = min(int(r["time"]) for r in nodes)
    minutes = lambda t: (int(t) - t0) / 60.0  # noqa: E731
    span = max(minutes(r["time"]) for r in nodes)
    warm = min(5.0, span * 0.2)
    fault_times = [minutes(f["time"]) for f in faults]
    settle = 2.0
    # The clients leave after the generators' last timeline row: the windows end there.
    end = min([span] + [minutes(r["time"]) for timeline in timelines for r in timeline[-1:]])
    windows = [(0.0, min(fault_times, default=end)), (max(fault_times, default=end) + settle, end)]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    print("--- soak: RSS and live-heap slopes per node process in its steady windows (after a "
          "%.1f min warm-up, outside the faults and %.0f min after them)" % (warm, settle))
    for k, node in enumerate(sorted({r["node"] for r in nodes}, key=int)):
        samples = [r for r in nodes if r["node"] == node]
        # One line per process: a restarted node starts a new one.
        for n, pid in enumerate(dict.fromkeys(r["pid"] for r in samples)):
            mine = [r for r in samples if r["pid"] == pid]
            rss = [(minutes(r["time"]), int(r["rss_kib"])) for r in mine]
            # Older runs have no live-heap column; a failed scrape leaves it empty.
            heap = [(minutes(r["time"]), int(r["allocated_kib"])) for r in mine if r.get("allocated_kib")]
            top.plot([x for x, _ in rss], [y / 1024 for _, y in rss], color="C%d" % k,
                     label="node%s RSS" % node if n == 0 else None)
            if heap:
                top.plot([x for x, _ in heap], [y / 1024 for _, y in heap], color="C%d" % k, linestyle="--",
                         label="node%s live heap" % node if n == 0 else None)
            start = rss[0][0]
            for lo, hi in windows:
                line = []
                for name, series in (("RSS", rss), ("live heap", heap)):
                    steady = [(x, y) for x, y in series if x - start >= warm and lo <= x <= hi]
                    if len(steady) < 3:
                        continue
                    s, mean = slope(steady)
                    line.append("%s %+.1f KiB/min (mean %.1f MiB, %+.2f %% per hour)" % (
                        name, s, mean / 1024, s * 60 * 100 / mean))
                    span_text = "minutes %.1f-%.1f" % (steady[0][0], steady[-1][0])
                if line:
                    print("node%s (pid %s), %s: %s" % (node, pid, span_text, "; ".join(line)))
    top.set_ylabel("RSS, live heap (MiB)")
    top.set_ylim(bottom=0)
    top.legend(loc="lower right")
    top.grid(alpha=0.3)

    p99s = []
    for g, timeline in enumerate(timelines):
        xs = [minutes(r["time"]) for r in timeline]
        ys = [int(r["p99_us"]) / 1000 for r in timeline]
        p99s += [y for y in ys if y > 0]
        bottom.plot(xs, ys, label="generator %d p99" % g)
    bottom.set_ylabel("live p99 per 10 s (ms, log)")
    bottom.set_yscale("log")
    bottom.set_xlabel("minutes")
    bottom.grid(alpha=0.3, which="both")
    if timelines:
        bottom.legend(loc="upper right")
    for fault in faults:
        for axis in (top, bottom):
            axis.axvline(minutes(fault["time"]), color="red", alpha=0.35, linewidth=1)
    if faults:
        top.text(minutes(faults[0]["time"]), 0, " faults", color="red", va="bottom")
    fig.suptitle("pushnode soak: %d nodes, %.0f min (red: subscriber kills, node SIGTERM and restart)" % (
        len({r["node"] for r in nodes}), span))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "soak.png"), dpi=100)
    if p99s:
        p99s.sort()
        print("--- soak: live p99 per 10 s: median %.2f ms, worst %.2f ms (%d intervals)" % (
            p99s[len(p99s) // 2], p99s[-1], len(p99s)))
    print("--- soak: plot in %s" % os.path.join(out, "soak.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
