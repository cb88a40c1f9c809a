"""Batches from a prepared corpus: windows, training streams split as batch_chunk does, evaluation streams."""
import numpy as np
import pytest
import torch
from corpora import in_memory_corpus

from ds_topkast.lm.data.batches import StreamBatches, WindowBatches, eval_streams
from ds_topkast.lm.data.corpus_cache import open_corpus
from ds_topkast.lm.data.corpus_sources import CorpusError, DataConfig


def corpus_of(train, valid, test, vocab=256):
    return in_memory_corpus({"train": train, "valid": valid, "test": test}, vocab)


def test_a_mapped_corpus_gives_the_same_batches_as_the_same_tokens_in_memory(tmp_path):
    mapped = open_corpus(DataConfig(max_bytes=60_000, cache_dir=str(tmp_path)))
    in_memory = corpus_of(*(np.array(mapped.splits[s]) for s in ("train", "valid", "test")))
    for step, micro in ((0, 0), (7, 1)):
        assert torch.equal(WindowBatches(mapped, 32, seed=3).train_batch(step, micro, 4, 1, 2),
                           WindowBatches(in_memory, 32, seed=3).train_batch(step, micro, 4, 1, 2))
    raw = bytes(np.array(mapped.train).tolist())
    window = WindowBatches(mapped, 32, seed=3).train_batch(5, 0, 1)[0]
    assert bytes(window.tolist()) in raw, "a window is 32 consecutive bytes of the train split"
    assert torch.equal(StreamBatches(mapped, 16, 8).train_batch(3, 2, 4), StreamBatches(in_memory, 16, 8).train_batch(3, 2, 4))


def test_window_batches_split_one_global_batch_across_ranks():
    corpus = corpus_of(np.arange(1000) % 256, np.arange(300) % 256, np.arange(200) % 256)
    batches = WindowBatches(corpus, seq_len=10, seed=3)
    whole = batches.train_batch(5, 1, rows=4)
    assert whole.dtype == torch.int64
    assert torch.equal(torch.cat([batches.train_batch(5, 1, 2, rank, 2) for rank in range(2)]), whole)
    one_rank = list(batches.eval_batches("valid", rows=4, count=3))
    two_ranks = [list(batches.eval_batches("valid", 2, 3, rank, 2)) for rank in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([two_ranks[0][i].tokens, two_ranks[1][i].tokens]), one_rank[i].tokens)


def test_whole_split_windows_predict_every_token_once_on_any_number_of_ranks():
    valid = np.arange(1, 101)
    batches = WindowBatches(corpus_of(np.arange(500) % 256, valid, valid), seq_len=10)
    for world in (1, 3, 8):
        shares = [list(batches.eval_batches("valid", 2, None, rank, world)) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1, "every rank runs the same number of forward passes"
        predicted = [t for share in shares for b in share if b.counted for row in b.tokens for t in row[1:].tolist()]
        assert sorted(predicted) == list(range(2, 101))[:len(predicted)] and len(predicted) == 99


def test_training_streams_are_the_same_whatever_the_ranks_and_accumulation():
    """The reference's batch_chunk: micro-steps split the streams, they never run through time on the same ones."""
    corpus = corpus_of(np.arange(4000) % 997, np.arange(300), np.arange(300), vocab=1000)
    streams = StreamBatches(corpus, seg_len=8, global_rows=8)
    step = 3
    whole = streams.train_batch(step, 0, 8)
    for world, accumulation in ((1, 1), (2, 1), (1, 4), (2, 2), (4, 2)):
        rows = 8 // (world * accumulation)
        parts = [streams.train_batch(step, (rank * accumulation + micro) * rows, rows)
                 for rank in range(world) for micro in range(accumulation)]
        assert torch.equal(torch.cat(parts), whole)
    first, second = streams.train_batch(0, 2, 2), streams.train_batch(1, 2, 2)
    assert first.shape == (2, 9)
    assert torch.equal(first[:, -1], second[:, 0]), "the next segment starts where this one's inputs end"
    assert torch.equal(first[:, 0], torch.tensor([1000, 1500]) % 997), "rows 2 and 3 are streams 2 and 3"
    assert torch.equal(streams.train_batch(streams.segments, 2, 2), first), "a stream wraps after its last segment"
    with pytest.raises(CorpusError, match="fewer than the 121 a segment needs"):
        StreamBatches(corpus, seg_len=120, global_rows=64)


def test_eval_streams_read_each_stream_to_its_end_like_the_reference_iterator():
    valid = np.arange(103)  # 10 streams of 10 tokens (3 dropped): 9 predicted each, segments of 4, 4, 1
    corpus = corpus_of(np.arange(4000) % 256, valid, valid, vocab=200)
    whole = list(eval_streams(corpus, "valid", streams=10, seg_len=4, rank=0, world=1))
    assert [b.tokens.shape for b in whole] == [(10, 5), (10, 5), (10, 2)]
    assert torch.equal(whole[0].tokens[:, 0], torch.arange(0, 100, 10))
    assert torch.equal(whole[1].tokens[:, 0], whole[0].tokens[:, -1])
    assert len(list(eval_streams(corpus, "valid", 10, 4, 0, 1, count=2))) == 2
    for world in (3, 12):
        shares = [list(eval_streams(corpus, "valid", 10, 4, rank, world)) for rank in range(world)]
        assert all(len(share) == 3 for share in shares)
        counted = torch.cat([share[0].tokens for share in shares if share[0].counted])
        assert torch.equal(counted, whole[0].tokens), "the ranks' counted streams are the streams, once each"
