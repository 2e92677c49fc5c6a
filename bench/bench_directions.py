"""CPU: distzo's counter-based z + add against MeZO's torch.randn + add_, same tensor size.

    PYTHONPATH=src python bench/bench_directions.py --numel 135000000
"""

import argparse
import time

import torch

from distzo.directions import add_direction_


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=135_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    theta = torch.zeros(args.numel)
    mezo = _time(lambda: theta.add_(torch.randn(args.numel), alpha=1e-3), args.repeats)
    ours = _time(lambda: add_direction_(theta, 1, 2, 1e-3), args.repeats)
    print(f"threads {torch.get_num_threads()}, numel {args.numel:,}")
    print(f"torch.randn + add_ : {mezo:.3f} s")
    print(f"distzo add_direction_: {ours:.3f} s  ({mezo / ours:.2f}x)")


if __name__ == "__main__":
    main()
