"""The one stopwatch of the benchmark scripts: a warm-up call, then repeated timed calls, reported by their median."""
import statistics
import time


def timed(function, *args, **kwargs):
    "(seconds, result) of one call of `function`."
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def repeated(function, *args, repeats=3, **kwargs):
    """(median, min, max seconds, result) of `repeats` timed calls of `function`, after one untimed warm-up
    call (first-call costs such as worker start-up, memory allocation and lazy initialisation)."""
    function(*args, **kwargs)
    times, result = [], None
    for _ in range(repeats):
        seconds, result = timed(function, *args, **kwargs)
        times.append(seconds)
    return statistics.median(times), min(times), max(times), result


def spread(median, low, high):
    "A timing as `median (min–max)`."
    return f"{median:.2f} ({low:.2f}–{high:.2f})"
