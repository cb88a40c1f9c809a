"""The dense store's checksums: CRC-32 on the host, sum64 where the tensor lives; either is checked by `matches`."""
import pytest
import torch

from ds_topkast.errors import DenseStoreError
from ds_topkast.store.cpu import CPUDenseStore
from ds_topkast.store.shards import checksum, matches, sum64


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.bool])
def test_sum64_sees_any_changed_entry_and_any_moved_pair(dtype):
    values = torch.randint(0, 200, (4099,), generator=torch.Generator().manual_seed(0)).to(dtype)
    recorded = sum64(values)
    assert recorded >= 2**62 and matches(values, recorded)
    for position in (0, 1, 2048, 4098):
        changed = values.clone()
        changed[position] = values[position] + 1 if dtype != torch.bool else ~values[position]
        assert not matches(changed, recorded), position
    i = int((values[:-1] != values[1:]).nonzero()[0])
    moved = values.clone()
    moved[[i, i + 1]] = values[[i + 1, i]]
    assert not matches(moved, recorded)
    assert not matches(values[:-1], recorded), "the length counts"


def test_a_host_tensor_gets_crc32_and_either_kind_is_checked_by_matches():
    values = torch.randn(1000)
    crc = checksum(values)
    assert crc < 2**32 and matches(values, crc) and matches(values, sum64(values))
    values[3] = -values[3]
    assert not matches(values, crc)


def test_sum64_works_across_chunks():
    import ds_topkast.store.shards as store

    values = torch.randn((1 << 22) + 5)
    one_chunk = sum64(values)
    store_chunk, store._SUM64_CHUNK = store._SUM64_CHUNK, 1000
    try:
        assert sum64(values) == one_chunk
    finally:
        store._SUM64_CHUNK = store_chunk


def test_a_store_built_for_one_rank_refuses_to_become_another():
    store = CPUDenseStore(rank=1, world=2)
    store.add_shard("layer", torch.arange(10.0)[5:], 10)
    assert store.layout("layer") == (5, 5) and torch.equal(store.read("layer"), torch.arange(5.0, 10.0))
    with pytest.raises(DenseStoreError, match="built as rank 1 of 2 and cannot become rank 0 of 2"):
        store.keep_shard(0, 2)
    with pytest.raises(DenseStoreError, match="holds entries \\[5, 10\\) of 10, but was given 4"):
        store.add_shard("other", torch.zeros(4), 10)
