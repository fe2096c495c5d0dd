"""bench/serve.py's server-side median: read from two scrapes of the server's latency histogram."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve.py"  # a script, not a package: load it by path
_spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
serve_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_bench)

INF = float("inf")


def test_server_median_leaves_out_refused_requests_and_earlier_ones():
    before = ({0.005: 4, 1.0: 6, 2.5: 6, 5.0: 6, INF: 6}, 4)  # 4 refused, 2 answered under 1 s before the level
    # During the level: 10 more refused (0 s), 20 answered in 1-2.5 s, 20 in 2.5-5 s.
    after = ({0.005: 14, 1.0: 16, 2.5: 36, 5.0: 56, INF: 56}, 14)
    assert serve_bench.server_p50_ms(before, after) == 2500.0  # the 20th of 40: the top of the 1-2.5 s bucket
    skewed = ({0.005: 14, 1.0: 16, 2.5: 26, 5.0: 56, INF: 56}, 14)  # 10 in 1-2.5 s, 30 in 2.5-5 s
    assert serve_bench.server_p50_ms(before, skewed) == 3333.3  # 2.5 + 2.5 * (20 - 10) / 30 s
    only_refused = ({0.005: 14, 1.0: 16, 2.5: 16, 5.0: 16, INF: 16}, 14)  # the level answered nothing
    assert serve_bench.server_p50_ms(before, only_refused) is None
