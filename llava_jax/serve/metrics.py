"""The server's counters, gauges and histograms in the Prometheus text format (version 0.0.4), by hand.

Everything lives on the event loop's thread (the request handlers update it, `/metrics` renders it), so
there is no lock; the gauges that belong to the engine (queue length, busy slots) are read from
`SlotEngine.stats()` at scrape time and passed to `render`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

PREFIX = "llava_jax"
# Seconds. Time to first token includes preprocessing and waiting for a slot; latency the whole answer.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus' client libraries keep them."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf's own
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Add one observation (seconds)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def lines(self, name: str) -> list[str]:
        """The `_bucket{le=...}`, `_sum` and `_count` samples; buckets are cumulative, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {running}"]


def _number(x: float) -> str:
    """Prometheus' spelling of a sample value or bucket bound."""
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else f"{x:.1f}"


class Metrics:
    """What `/metrics` reports besides the engine's gauges."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}  # (route, HTTP status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def count_request(self, route: str, status: int) -> None:
        """One finished HTTP request (a streamed one counts when its response started)."""
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def render(self, engine: Mapping[str, int]) -> str:
        """The exposition text; `engine` is `SlotEngine.stats()`."""
        p = PREFIX
        lines = [f"# HELP {p}_requests_total HTTP requests answered, by route and status code.",
                 f"# TYPE {p}_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'{p}_requests_total{{route="{route}",status="{status}"}} {n}')
        scalars = [
            ("prompt_tokens_total", "counter", "Prompt tokens of chat completions (images expanded).",
             self.prompt_tokens),
            ("generated_tokens_total", "counter", "Tokens generated for chat completions.", self.generated_tokens),
            ("queue_length", "gauge", "Requests submitted and waiting for a decode slot.", engine["queued"]),
            ("busy_slots", "gauge", "Decode slots holding a request.", engine["busy"]),
            ("max_slots", "gauge", "Decode slots (--max-batch).", engine["max_batch"]),
            ("compiles_total", "counter", "Programs the engine compiled (steady serving adds none).",
             engine["compiles"]),
        ]
        for name, kind, help_text, value in scalars:
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"]
        for name, help_text, hist in [
            ("time_to_first_token_seconds", "From the request's arrival to its first generated token.", self.ttft),
            ("request_latency_seconds", "From the request's arrival to its last token.", self.latency),
        ]:
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} histogram", *hist.lines(f"{p}_{name}")]
        return "\n".join(lines) + "\n"
