"""The in-memory shard cache (train.cache): the same batches as streaming, epochs after the first read no file,
and a shard over the bound still trains (streamed) or, with train.cache=memory, fails naming the figures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparkml_dist.loader import build_loader_spec, iterate_batches
from sparkml_dist.readers import cache as cache_mod
from sparkml_dist.readers.cache import CacheError, build_cache
from tests.test_loader import _train, manifest, raw  # noqa: F401  (module fixtures: real partitioned shards)


def _epoch(spec, epoch, cache=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with iterate_batches(spec, epoch, cache) as batches:
        return [(x.clone(), y.clone()) for x, y in batches]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("rank", [0, 1])  # the shards differ in size: the larger one's tail is left in epoch 1
def test_cached_epochs_are_the_streamed_epochs_bit_for_bit_and_then_read_no_file(
    manifest,  # noqa: F811
    shuffle,
    rank,
    monkeypatch,
):
    spec = build_loader_spec(manifest, rank, 2, _train(shuffle=shuffle, reader="arrow"), split="train")
    cache = build_cache(spec, "memory", 0, 2)
    assert cache is not None
    for epoch in range(4):
        if epoch == 2:  # epoch 1 streamed, epoch 2 read what epoch 1 did not reach: no file from here on
            assert cache.complete
            monkeypatch.setattr(cache_mod, "plan_row_groups", lambda *a: pytest.fail("read a file from memory"))
        cached, streamed = _epoch(spec, epoch, cache), _epoch(spec, epoch)
        assert len(cached) == len(streamed) == spec.steps
        for (cx, cy), (sx, sy) in zip(cached, streamed, strict=True):
            assert torch.equal(cx, sx) and torch.equal(cy, sy)
    assert cache.nbytes > 0


def test_a_shard_over_the_bound_streams_under_auto_and_fails_clearly_under_memory(manifest, caplog):  # noqa: F811
    spec = build_loader_spec(manifest, 0, 2, _train(reader="arrow"), split="train")
    with caplog.at_level("INFO", logger="sparkml_dist.readers.cache"):
        assert build_cache(spec, "auto", 0.001, 1) is None
    assert "exceeds the 0 MB bound: streamed" in caplog.text
    assert len(_epoch(spec, 0)) == spec.steps  # streamed, all steps
    with pytest.raises(
        CacheError,
        match=r"train.cache=memory: .* needs about \d+ MB decoded, more than the 0 MB "
        r"bound: raise train.cache_max_mb",
    ):
        build_cache(spec, "memory", 0.001, 1)
    assert build_cache(spec, "off", 0, 1) is None
    assert build_cache(dataclasses.replace(spec), "auto", 0, 1) is not None  # the derived bound fits it


def test_training_over_the_cache_bound_streams_and_ends_like_a_cached_run(spark, manifest, tmp_path):  # noqa: F811
    from sparkml_dist.config import load_config
    from sparkml_dist.fit import run_training

    def run(*sets: str):
        cfg = load_config(None, [f"paths.work_dir={tmp_path}", f"train.manifest_url={manifest.root_url}",
                                 "train.batch_size=64", "train.epochs=2", "tracking.log_model=false",
                                 "launch.backend=in_process", "train.reader=arrow", *sets])  # fmt: skip
        return run_training(spark, cfg).final

    streamed = run("train.cache=auto", "train.cache_max_mb=0.001")
    cached = run("train.cache=memory")
    assert streamed["val_log_loss"] == cached["val_log_loss"] and streamed["train_loss"] == cached["train_loss"]


def test_a_filled_cache_reads_no_file_in_any_epoch_and_yields_the_streamed_batches(manifest, monkeypatch):  # noqa: F811
    spec = build_loader_spec(manifest, 1, 2, _train(shuffle=True, reader="arrow"), split="train")
    cache = build_cache(spec, "auto", 0, 2)
    assert cache is not None and cache.fill() >= 0 and cache.complete
    monkeypatch.setattr(cache_mod, "plan_row_groups", lambda *a: pytest.fail("read a file from memory"))
    for epoch in range(2):
        streamed = _epoch(spec, epoch)
        cached = _epoch(spec, epoch, cache)
        assert len(cached) == len(streamed) == spec.steps
        assert all(torch.equal(cx, sx) and torch.equal(cy, sy)
                   for (cx, cy), (sx, sy) in zip(cached, streamed, strict=True))  # fmt: skip
