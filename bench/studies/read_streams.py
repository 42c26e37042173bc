"""How fast one read-only pass can go here: the sum of squares of 512 MiB of fp32 (out of
cache), in float64 like the clip's norm, on one thread and on numba's threads, reading each
part as one, four or eight streams at once. The clip's floor comes from it (see RESULTS.md).

    python -m bench.studies.read_streams
"""
import time

import numpy as np
from numba import njit, prange

_FASTMATH = {"nsz", "contract", "reassoc"}


@njit(fastmath=_FASTMATH, nogil=True)
def one_stream(x):
    total = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        total += v * v
    return total


@njit(fastmath=_FASTMATH, nogil=True)
def four_streams(x):
    q = x.shape[0] // 4
    t0 = t1 = t2 = t3 = 0.0
    for i in range(q):
        a, b = np.float64(x[i]), np.float64(x[q + i])
        c, d = np.float64(x[2 * q + i]), np.float64(x[3 * q + i])
        t0 += a * a
        t1 += b * b
        t2 += c * c
        t3 += d * d
    return (t0 + t1) + (t2 + t3)


@njit(fastmath=_FASTMATH, nogil=True)
def eight_streams(x):
    q = x.shape[0] // 8
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = 0.0
    for i in range(q):
        a, b = np.float64(x[i]), np.float64(x[q + i])
        c, d = np.float64(x[2 * q + i]), np.float64(x[3 * q + i])
        e, f = np.float64(x[4 * q + i]), np.float64(x[5 * q + i])
        g, h = np.float64(x[6 * q + i]), np.float64(x[7 * q + i])
        t0 += a * a
        t1 += b * b
        t2 += c * c
        t3 += d * d
        t4 += e * e
        t5 += f * f
        t6 += g * g
        t7 += h * h
    return ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7))


@njit(fastmath=_FASTMATH, nogil=True, parallel=True)
def _in_parts(x, parts, kind):
    n = x.shape[0]
    out = np.zeros(parts)
    for k in prange(parts):
        part = x[n * k // parts:n * (k + 1) // parts]
        out[k] = (one_stream(part) if kind == 1 else four_streams(part) if kind == 4
                  else eight_streams(part))
    return out.sum()


def _median_ms(function, rounds=9):
    function()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e3


def main():
    x = np.random.default_rng(0).standard_normal(1 << 27, dtype=np.float32)
    print(f"{x.nbytes / 2 ** 20:.0f} MiB of fp32; GB/s = bytes read / median time")
    for kind, function in ((1, one_stream), (4, four_streams), (8, eight_streams)):
        alone = _median_ms(lambda: function(x))
        parts = _median_ms(lambda: _in_parts(x, 8192, kind))
        print(f"{kind} stream(s): one thread {x.nbytes / alone / 1e6:5.1f} GB/s, "
              f"numba's threads over 8192 parts {x.nbytes / parts / 1e6:5.1f} GB/s")


if __name__ == "__main__":
    main()
