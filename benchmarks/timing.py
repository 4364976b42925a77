"""The one stopwatch of the benchmark scripts."""
import time


def timed(function, *args, **kwargs):
    "(seconds, result) of one call of `function`."
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result
