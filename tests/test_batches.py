"""SupportBatches: full shuffled batches, and the query batch the transductive term adds behind them."""

from __future__ import annotations

import itertools

import torch

from l2l_peft.batches import SupportBatches


def batches(n_query: int) -> SupportBatches:
    images = torch.arange(10.0).reshape(10, 1, 1, 1).expand(10, 1, 4, 4)  # pixel value = support index
    query = 100 + torch.arange(float(n_query)).reshape(-1, 1, 1, 1).expand(n_query, 1, 4, 4)
    return SupportBatches(
        images, torch.arange(10), batch=4, generator=torch.Generator().manual_seed(0), augment=False,
        unlabelled=query,
    )  # fmt: skip


def test_query_batch_follows_the_support_batch_and_covers_the_query():
    seen = []
    for x, y in itertools.islice(batches(n_query=6), 6):
        assert x.shape == (8, 1, 4, 4) and y.shape == (4,)
        torch.testing.assert_close(x[:4, 0, 0, 0], y.float())  # labels match the support part
        seen.append(x[4:, 0, 0, 0])
    per_epoch = torch.cat(seen).reshape(-1, 4)  # 6 query images in batches of 4: one full batch an epoch
    for epoch in per_epoch:
        assert epoch.unique().numel() == 4 and (epoch >= 100).all()
    assert torch.cat(seen).unique().numel() == 6  # fresh orders reach every query image


def test_small_query_gives_a_smaller_batch_and_none_gives_the_support_alone():
    x, y = next(iter(batches(n_query=2)))
    assert x.shape == (6, 1, 4, 4) and y.shape == (4,)
    x, y = next(iter(batches(n_query=0)))
    assert x.shape == (4, 1, 4, 4)
