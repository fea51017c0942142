"""torch._grouped_mm column for bench_grouped_matmul.py, run in its own process.

  python3 experiments/bench_grouped_matmul_torch.py SPEC.json   (rows: E, M, K, N, group_sizes)
Prints one JSON line: per row {fwd_ms, fwd_bwd_ms, dense_fwd_ms, dense_fwd_bwd_ms} (medians,
CUDA events around each call) or {error}. The dense times are torch's own x @ w[0] of the same
FLOPs, timed the same way in this process: torch's share of dense is taken against them.
"""
import json
import statistics
import sys

import torch


def bench(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def row(spec, reps):
    e, m, k, n = spec["E"], spec["M"], spec["K"], spec["N"]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(e, k, n, device="cuda") / k ** 0.5).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    offs = torch.cumsum(torch.tensor(spec["group_sizes"], device="cuda"), 0).to(torch.int32)
    def fwd():
        return torch._grouped_mm(x, w, offs=offs)

    def fwd_bwd():
        y = torch._grouped_mm(x, w, offs=offs)
        return torch.autograd.grad(y, (x, w), dy)

    w0 = w[0].detach().clone().requires_grad_()

    def dense_fwd_bwd():
        y = x @ w0
        return torch.autograd.grad(y, (x, w0), dy)

    with torch.no_grad():
        t_f = bench(fwd, reps)
        t_df = bench(lambda: x @ w0, reps)
    return {"fwd_ms": t_f, "fwd_bwd_ms": bench(fwd_bwd, reps), "dense_fwd_ms": t_df,
            "dense_fwd_bwd_ms": bench(dense_fwd_bwd, reps)}


def main():
    spec = json.load(open(sys.argv[1]))
    out = []
    for r in spec["rows"]:
        try:
            out.append(row(r, spec["reps"]))
        except Exception as ex:
            out.append({"error": f"{type(ex).__name__}: {str(ex)[:300]}"})
        print(r["E"], r["K"], r["N"], r["pattern"], out[-1], file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
