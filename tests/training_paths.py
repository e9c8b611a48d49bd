"""Which training path a job took, for tests that compare two paths (pipelined vs plain loop, grouped vs
copied users): such a comparison would pass trivially if a setting stopped reaching the trainer."""

import collections

import pytest
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from dist_mtl.data.batch import GroupedBatch
from dist_mtl.trainer import Trainer

_SPIED = {
    "pipeline": (TrainPipelineSparseDist, "progress"),  # a pipelined training step
    "plain_loop": (Trainer, "train_step"),  # a step of the plain loop
    "expanded": (GroupedBatch, "expanded"),  # user rows copied onto impressions (data.grouped = false)
}


def count_training_paths(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts calls of each spied path from now on (until ``monkeypatch`` is undone)."""
    counts: collections.Counter = collections.Counter()
    for key, (cls, name) in _SPIED.items():
        original = getattr(cls, name)

        def spy(*args, _original=original, _key=key, **kwargs):
            counts[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    return counts


def assert_path(counts: collections.Counter, *, pipeline: bool, grouped: bool = True) -> None:
    assert (counts["pipeline"] > 0, counts["plain_loop"] > 0) == (pipeline, not pipeline), counts
    assert (counts["expanded"] > 0) == (not grouped), counts


def train_checking_path(cfg) -> dict:
    """``Trainer(cfg).train()``, after checking that it trained on the path ``cfg`` asks for."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        counts = count_training_paths(monkeypatch)
        summary = Trainer(cfg).train()
    assert_path(counts, pipeline=cfg.train.pipeline, grouped=cfg.data.grouped)
    return summary
