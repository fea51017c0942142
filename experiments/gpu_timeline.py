"""The GPU's timeline in a profiler trace: time covered by kernels (streams overlap) and the idle gaps
between them, by length and by the (kernel before, kernel after) pair around each.

Events are (name, start ns, duration ns, stats) as `timing.gpu_events_with_stats` returns them.
"""
from __future__ import annotations

import collections
import re


def busy_ns(events) -> int:
    """Time covered by at least one event (streams overlap)."""
    total, end = 0, None
    for _, s, d, *_ in sorted(events, key=lambda e: e[1]):
        if end is None or s >= end:
            total, end = total + d, s + d
        elif s + d > end:
            total, end = total + s + d - end, s + d
    return total


GAP_BUCKETS_US = (5, 20, 100)


def gaps(events, steps: int, top: int = 15) -> dict:
    """The GPU's idle time inside the traced span: each gap between the end of all work so far and the
    next kernel, per step — in total, by length (`GAP_BUCKETS_US`), and the `top` (kernel before,
    kernel after) pairs by total gap. A kernel launched from a CUDA graph (XLA's command buffers)
    is marked [graph]: gaps at graph boundaries and around kernels launched one by one show here. A
    copy carries its program (hlo_module) and size."""
    def label(name, st):  # a copy names its program and size: what it copies is otherwise unknown
        if name.startswith("Memcpy"):
            size = re.search(r"size:(\d+)", str(st.get("memcpy_details", "")))
            name += f" ({st.get('hlo_module', '?')}{f', {int(size.group(1)) / 2**20:.1f} MiB' if size else ''})"
        return name[:90] + (" [graph]" if "cuda_graph_id" in st else "")
    pairs = collections.defaultdict(lambda: [0, 0])
    edges = (*GAP_BUCKETS_US, float("inf"))
    buckets = {f"<{b}us" if b != float("inf") else f">={GAP_BUCKETS_US[-1]}us": [0, 0] for b in edges}
    end, before = None, None
    ev = sorted(events, key=lambda e: e[1])
    first = next((i for i, e in enumerate(ev) if not e[0].startswith("Memcpy")), 0)
    for name, s, d, st in ev[first:]:  # from the first kernel: the first step's input copy precedes its dispatch
        if end is not None and s > end:
            g = s - end
            row = pairs[(before, label(name, st))]
            row[0], row[1] = row[0] + g, row[1] + 1
            b = next(k for k, e in zip(buckets, edges) if g < e * 1e3)
            buckets[b][0] += g
            buckets[b][1] += 1
        if end is None or s + d > end:
            end, before = s + d, label(name, st)
    per = lambda ns: ns / steps / 1e6  # noqa: E731
    rows = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]
    return {"ms_per_step": per(sum(v[0] for v in pairs.values())),
            "count_per_step": sum(v[1] for v in pairs.values()) / steps,
            "buckets": {k: {"ms_per_step": per(ns), "count_per_step": n / steps} for k, (ns, n) in buckets.items()},
            "top": [{"before": a, "after": b, "ms_per_step": per(ns), "count_per_step": n / steps}
                    for (a, b), (ns, n) in rows]}
