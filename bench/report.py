"""Figures from the samples: a table on the terminal, a CSV, a PNG chart (when
matplotlib, the optional `plot` extra, is installed) and the targets of issues 4 and 11."""
import csv
import math
import statistics

FLOOR, ANCHOR, INTERPRETER, CONSOLE, BINARY, INSTREAM = "a", "b", "c", "d", "e", "clamd"
COLUMNS = ("scanner", "size", "concurrency", "variant", "n", "median_ms", "p95_ms", "p99_ms",
           "cpu_ms", "page_faults", "peak_rss_mb", "x_b", "x_c", "cpu_x_c")


def percentile(values, fraction):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summarise(results):
    """results: {(scanner, size, concurrency): {variant: [Sample]}} -> rows (dicts)."""
    rows = []
    for (scanner, size, concurrency), by_variant in results.items():
        medians = {v: statistics.median(s.seconds for s in samples) for v, samples in by_variant.items()}
        cpu_medians = {v: _median([s.cpu_seconds for s in samples]) for v, samples in by_variant.items()}
        for variant, samples in by_variant.items():
            rss = [s.max_rss_kb for s in samples if s.max_rss_kb is not None]
            faults = _median([s.page_faults for s in samples])
            cpu, cpu_c = cpu_medians[variant], cpu_medians.get(INTERPRETER)
            rows.append({
                "scanner": scanner, "size": size, "concurrency": concurrency, "variant": variant,
                "n": len(samples),
                "median_ms": medians[variant] * 1e3,
                "p95_ms": percentile([s.seconds for s in samples], 0.95) * 1e3,
                "p99_ms": percentile([s.seconds for s in samples], 0.99) * 1e3,
                "cpu_ms": cpu * 1e3 if cpu is not None else None,
                "page_faults": faults,
                "peak_rss_mb": max(rss) / 1024 if rss else None,
                "x_b": medians[variant] / medians[ANCHOR] if ANCHOR in medians else None,
                "x_c": medians[variant] / medians[INTERPRETER] if INTERPRETER in medians else None,
                "cpu_x_c": cpu / cpu_c if cpu is not None and cpu_c else None,
            })
    return rows


def _median(values):
    """Median of the values measured (None: not measured, e.g. clamd's INSTREAM)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cell(value, digits=2):
    return "-" if value is None else "%.*f" % (digits, value) if isinstance(value, float) else str(value)


def print_table(rows, names):
    header = ("scanner", "size", "conc", "variant", "n", "median", "p95", "p99", "cpu",
              "faults", "rss MB", "x(b)", "x(c)", "cpu x(c)")
    lines = [header]
    for r in rows:
        lines.append((r["scanner"], human_size(r["size"]), str(r["concurrency"]),
                      "(%s) %s" % (r["variant"], names[r["variant"]]), str(r["n"]),
                      _cell(r["median_ms"]), _cell(r["p95_ms"]), _cell(r["p99_ms"]),
                      _cell(r["cpu_ms"]), _cell(r["page_faults"], 0), _cell(r["peak_rss_mb"], 1),
                      _cell(r["x_b"]), _cell(r["x_c"]), _cell(r["cpu_x_c"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print("times in ms (median wall time, p95, p99; cpu: median CPU time); faults: median minor\n"
          "page faults; both of the process and the qmail-queue.orig it execs; rss: peak over all runs;\n"
          "x(b), x(c): median wall time over (b)'s, (c)'s; cpu x(c): median CPU time over (c)'s")
    for line in lines:
        print("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(line, widths))))


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("%.4f" % v if isinstance(v, float) else v) for k, v in r.items()})


def write_chart(rows, names, path):
    """Median latency by size at concurrency 1: one panel per scanner, one line per
    variant (the same colour in every panel)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot

    scanners = sorted({r["scanner"] for r in rows if r["concurrency"] == 1})
    variants = sorted({r["variant"] for r in rows})
    colours = dict(zip(variants, pyplot.rcParams["axes.prop_cycle"].by_key()["color"]))
    figure, panels = pyplot.subplots(1, len(scanners), figsize=(5 * len(scanners), 5),
                                     sharey=True, squeeze=False)
    for axes, scanner in zip(panels[0], scanners):
        for variant in variants:
            points = sorted((r["size"], r["median_ms"]) for r in rows if r["concurrency"] == 1
                            and r["scanner"] == scanner and r["variant"] == variant)
            if points:
                axes.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                          color=colours[variant], label="(%s) %s" % (variant, names[variant]))
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_title(scanner)
        axes.set_xlabel("message size (bytes)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    panels[0][0].set_ylabel("median latency per message, one at a time (ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


def human_size(size):
    return "%dM" % (size >> 20) if size >= 1 << 20 else "%dK" % (size >> 10)


def targets(rows):
    """The targets this run has the figures for: (issue, text, value, limit, stretch)."""
    by = {(r["scanner"], r["size"], r["concurrency"], r["variant"]): r for r in rows}

    def row(scanner, size, variant):
        return by.get((scanner, size, 1, variant)) or {}

    found = []
    for size in sorted({r["size"] for r in rows if r["size"] <= 64 << 10}):
        a, b, c, d, e = (row("responder", size, v) for v in (FLOOR, ANCHOR, INTERPRETER, CONSOLE, BINARY))
        tag = "%s, instant scanner" % human_size(size)
        if a and c and e:
            found.append((4, "(e)-(a) / (c)-(a) at %s" % tag,
                          (e["median_ms"] - a["median_ms"]) / (c["median_ms"] - a["median_ms"]), 1.0, 0.8))
        if d and e:
            found.append((4, "(e) / (d) at %s" % tag, e["median_ms"] / d["median_ms"], 0.5, None))
        if c and e:
            found.append((11, "CPU (e) / (c) at %s" % tag, e["cpu_ms"] / c["cpu_ms"], 0.5, 0.4))
        if b and e:
            found.append((11, "wall (e) / (b) at %s" % tag, e["median_ms"] / b["median_ms"], 2.5, None))
    for r in rows:
        if r["variant"] == BINARY and r["size"] == 10 << 20 and r["peak_rss_mb"] is not None:
            found.append((4, "peak RSS of (e), 10M, %s, concurrency %d (MB)" % (r["scanner"], r["concurrency"]),
                          r["peak_rss_mb"], 20.0, None))
    rss = [r["peak_rss_mb"] for r in rows if r["variant"] == BINARY and r["peak_rss_mb"] is not None]
    if rss:
        found.append((11, "peak RSS of (e), every run (MB)", max(rss), 10.0, 8.0))
    e, instream = row("scand-clamd", 1 << 20, BINARY), row("scand-clamd", 1 << 20, INSTREAM)
    if e and instream:
        found.append((4, "(e) through fpqmail-scand+clamd / clamd INSTREAM alone, 1M",
                      e["median_ms"] / instream["median_ms"], 1.2, None))
    return found


def print_targets(found):
    for issue in sorted({f[0] for f in found}):
        print("\ntargets (issue %d):" % issue)
        for _, text, value, limit, stretch in (f for f in found if f[0] == issue):
            verdict = "%s (limit %g)" % ("met" if value <= limit else "MISSED", limit)
            if stretch is not None:
                verdict += "; stretch %g %s" % (stretch, "met" if value <= stretch else "missed")
            print("  %-62s %7.2f  %s" % (text, value, verdict))
