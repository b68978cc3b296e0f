"""Timing helpers the benchmarks share: latencies of one function, or of several in turn."""

import threading
import time

import numpy as np


def latencies(fn, requests, threads=1, warmup=20):
    """(milliseconds per call of fn(request), requests/s), after `warmup` calls; each of
    `threads` clients calls in turn on its share of `requests`."""
    for r in requests[:warmup]:
        fn(r)
    times = [[] for _ in range(threads)]

    def client(k):
        for r in requests[k::threads]:
            start = time.perf_counter()
            fn(r)
            times[k].append(time.perf_counter() - start)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    return 1e3 * np.concatenate(times), len(requests) / wall


def paired(fns, requests, threads=1, warmup=20):
    """Milliseconds per call of each fn(request), called in turn on each request (the order
    alternating), so that drifting load hits them alike; after `warmup` requests."""
    for r in requests[:warmup]:
        for fn in fns:
            fn(r)
    times = [[[] for _ in fns] for _ in range(threads)]

    def client(k):
        for i, r in enumerate(requests[k::threads]):
            order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
            for j in order:
                start = time.perf_counter()
                fns[j](r)
                times[k][j].append(time.perf_counter() - start)

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [1e3 * np.concatenate([times[k][j] for k in range(threads)]) for j in range(len(fns))]
