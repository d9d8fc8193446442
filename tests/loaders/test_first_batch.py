"""Each worker's first request of an iteration carries one batch (the first batches arrive as soon as
one batch is loaded, fresh or resumed); later requests carry `batches_per_fetch`."""

from __future__ import annotations

import pytest

from prep.loaders import DataLoader, SequenceDataset


@pytest.mark.parametrize("batches", [1, 2, 3, 7, 8])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
@pytest.mark.parametrize("per_fetch", [1, 2, 3])
def test_each_worker_starts_with_one_batch_then_full_groups(batches, workers, per_fetch):
    ds = SequenceDataset([{"x": i} for i in range(2 * batches)], 2, shuffle=False, world_size=1)
    loader = DataLoader(ds, num_workers=workers, batches_per_fetch=per_fetch)
    sampler = loader._torch.sampler  # the requests, planned in this process (no worker is started)
    sizes = [len(group) for group in sampler]
    first = min(workers, batches)
    assert sizes[:first] == [1] * first
    assert all(s == per_fetch for s in sizes[first:-1]) and 1 <= sizes[-1] <= max(1, per_fetch)
    assert sum(sizes) == batches and len(sizes) == len(sampler)


def test_a_resumed_loader_delivers_the_same_batches_with_workers():
    def make():
        ds = SequenceDataset([{"x": i} for i in range(40)], 4, shuffle=True, seed=2, world_size=1)
        return DataLoader(ds, num_workers=2, batches_per_fetch=3)

    whole = [b["x"].tolist() for b in make()]
    loader = make()
    it = iter(loader)
    head = [next(it)["x"].tolist() for _ in range(3)]
    state = loader.state_dict()
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [b["x"].tolist() for b in resumed] == whole
