"""The load test's numbers: latencies, throughput, errors, and the server's footprint."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p50 of [1, 2, 3, 4] is 2); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Report:
    started: float = 0.0
    finished: float = 0.0
    uploads: int = 0
    verified: int = 0
    corrupted: int = 0
    failed: int = 0
    resumes: int = 0
    bytes_sent: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    server_peak_rss_mb: float | None = None
    server_cpu_seconds: float | None = None

    def record(self, kind: str, seconds: float) -> None:
        self.latencies[kind].append(seconds)

    @property
    def seconds(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def ok(self) -> bool:
        """A single corrupted or lost upload fails the run, whatever the throughput."""
        return self.corrupted == 0 and self.failed == 0 and self.verified == self.uploads

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "uploads": self.uploads,
            "verified": self.verified,
            "corrupted": self.corrupted,
            "failed": self.failed,
            "resumes": self.resumes,
            "bytes": self.bytes_sent,
            "mb_per_s": round(self.bytes_sent / self.seconds / 1e6, 2),
            "uploads_per_s": round(self.verified / self.seconds, 2),
            "latency_ms": {
                kind: {
                    "count": len(values),
                    "p50": round(percentile(values, 0.50) * 1000, 2),
                    "p95": round(percentile(values, 0.95) * 1000, 2),
                    "p99": round(percentile(values, 0.99) * 1000, 2),
                }
                for kind, values in sorted(self.latencies.items())
            },
            "errors": dict(self.errors),
            "server_peak_rss_mb": self.server_peak_rss_mb,
            "server_cpu_seconds": self.server_cpu_seconds,
        }
