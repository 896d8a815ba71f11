"""f32 GEMM peak of this machine as PyTorch's BLAS reaches it: the best GFLOP/s of square
matrix products (sizes 512..2048, three trials each), with the given threads. Prints one JSON
line. The rate moves between runs on a shared machine (206 and 269 GFLOP/s were both seen on
the same day), so benches/score_speed.sh measures it before and after and keeps the higher."""

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    best = 0.0
    for n in (512, 1024, 2048):
        x, y = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            x @ y
        reps = max(3, int(2e10 / (2 * n**3)))
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                x @ y
            secs = time.perf_counter() - t0
            best = max(best, 2 * n**3 * reps / secs / 1e9)
    print(json.dumps({"gemm_gflops": best, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
