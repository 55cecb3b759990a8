"""k-means feature extraction in worker processes stays memory-bounded with a slow consumer."""

import multiprocessing
import time

import numpy as np

from sslasr.data import frame_features
from sslasr.data.frame_features import PENDING_PER_JOB, cut_features


class _Counting:
    """An extractor that counts the cuts it has computed, over every worker process."""

    def __init__(self, counter):
        self.counter = counter

    def __call__(self, cut) -> np.ndarray:
        with self.counter.get_lock():
            self.counter.value += 1
        return np.full((2, 3), cut, dtype=np.float32)


def test_workers_compute_at_most_a_few_cuts_ahead_of_a_slow_consumer(monkeypatch):
    counter = multiprocessing.get_context("fork").Value("i", 0)
    # the workers are forked after this, so they build the counting extractor
    monkeypatch.setattr(frame_features, "build_features", lambda *args, **kwargs: _Counting(counter))
    num_jobs, cuts = 2, list(range(40))
    limit = PENDING_PER_JOB * num_jobs
    received = []
    for consumed, (cut, features) in enumerate(cut_features(iter(cuts), "mfcc", num_jobs=num_jobs), start=1):
        time.sleep(0.01)  # slower than the workers: unbounded, they would finish every cut meanwhile
        assert counter.value - consumed <= limit
        received.append(cut)
        assert np.all(features == cut)
    assert received == cuts and counter.value == len(cuts)
