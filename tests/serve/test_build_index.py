"""`serve.build_index`: the progress bar covers prompt building, and Ray embedders keep few chunks in flight."""
from __future__ import annotations

import copy

from serve.build_index import build_index


def test_the_progress_bar_counts_every_song_embedded(serve_run, capsys):
    # Building the prompts is part of the bar (at 100k songs it was 10 silent minutes before any bar appeared).
    from serve.engines.hf import HFEngine

    cfg, run = serve_run
    index = build_index(copy.deepcopy(cfg), run, HFEngine(run.model / "bundle"), progress=True)
    err = capsys.readouterr().err
    n = len(index)
    assert "embedding the catalogue" in err and f"{n}/{n}" in err


class _FakePool:
    """ActorPool's submit / get_next / has_next, run in order, recording how many chunks were outstanding."""

    def __init__(self):
        self.queue, self.most_outstanding = [], 0

    def submit(self, fn, value):
        self.queue.append(value)
        self.most_outstanding = max(self.most_outstanding, len(self.queue))

    def get_next(self):
        return [2 * v for v in self.queue.pop(0)]

    def has_next(self):
        return bool(self.queue)


def test_ray_embedding_builds_prompts_only_as_results_come_back():
    # ActorPool.map submitted every chunk before the first result: at 100k songs the driver held every prompt.
    from serve.build_index import _ordered_map

    built = []

    def chunks():
        for i in range(10):
            built.append(i)
            yield [i]

    pool = _FakePool()
    results = _ordered_map(pool, chunks(), in_flight=3)
    assert next(results) == [0] and len(built) == 4  # three submitted, the first returned before the fourth is built
    assert list(results) == [[2 * i] for i in range(1, 10)]  # every chunk, in order
    assert pool.most_outstanding == 3
