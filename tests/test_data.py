"""Corpora (files, folders, globs, hub names), tokenisers, splits and the two batch layouts."""
import pytest
import torch

from ds_topkast import data
from ds_topkast.data import CorpusError, DataConfig, StreamBatches, WindowBatches, load_corpus


def write(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_files_folders_and_globs_read_the_same_bytes_in_sorted_order(tmp_path):
    write(tmp_path / "c" / "b.txt", b"second ")
    write(tmp_path / "c" / "a.txt", b"first ")
    write(tmp_path / "c" / "sub" / "z.md", b"third")
    folder = load_corpus(DataConfig(path=str(tmp_path / "c"), eval_fraction=0.1))
    assert bytes(torch.cat([folder.train, folder.eval]).tolist()) == b"first second third"
    globbed = load_corpus(DataConfig(path=str(tmp_path / "c" / "*.txt"), eval_fraction=0.1))
    assert bytes(torch.cat([globbed.train, globbed.eval]).tolist()) == b"first second "
    assert (folder.unit, folder.vocab_size) == ("byte", 256)


@pytest.mark.parametrize("path,message", [("missing.txt", "does not exist"), ("*.nothing", "does not exist"),
                                          ("empty_dir", "holds no files"), ("empty.txt", "is empty")])
def test_missing_and_empty_corpora_fail_with_the_fix(tmp_path, path, message):
    (tmp_path / "empty_dir").mkdir()
    write(tmp_path / "empty.txt", b"")
    with pytest.raises(CorpusError, match=message):
        load_corpus(DataConfig(path=str(tmp_path / path)))


def test_the_default_corpus_is_the_standard_library_source():
    corpus = load_corpus(DataConfig(max_bytes=50_000))
    assert len(corpus.train) + len(corpus.eval) == 50_000
    assert b"import" in bytes(corpus.train[:5000].tolist())


def test_enwik8_takes_the_standard_split(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ENWIK8_SPLIT", (900, 50, 50))  # the real one is 90M / 5M / 5M bytes
    content = bytes(range(32, 127)) * 11
    corpus = load_corpus(DataConfig(path=str(write(tmp_path / "enwik8", content[:1000]))))
    assert bytes(corpus.train.tolist()) == content[:900] and bytes(corpus.eval.tolist()) == content[900:950]


def test_word_vocabulary_ends_lines_with_eos(tmp_path):
    corpus = load_corpus(DataConfig(path=str(write(tmp_path / "t.txt", b"a b a\nc a\n" * 10)), tokenizer="words",
                                    eval_fraction=0.2))
    assert corpus.unit == "token" and corpus.vocab_size == 5  # <eos> <unk> a b c
    assert corpus.train[:6].tolist() == [2, 3, 2, 0, 4, 2]


def test_a_local_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    corpus = load_corpus(DataConfig(path=str(write(tmp_path / "t.txt", b"hello world moon " * 20)),
                                    tokenizer=str(tmp_path / "tok"), eval_fraction=0.25))
    assert corpus.vocab_size == 3 and corpus.train[:3].tolist() == [1, 2, 0]


def test_text_modes_refuse_non_utf8_and_name_the_fix(tmp_path):
    binary = write(tmp_path / "b.bin", b"ok \xff\xfe bad")
    with pytest.raises(CorpusError, match="not UTF-8 text.*use data.tokenizer 'bytes'"):
        load_corpus(DataConfig(path=str(binary), tokenizer="words"))
    with pytest.raises(CorpusError, match="binary applies to byte-level mode only"):
        load_corpus(DataConfig(path=str(binary), tokenizer="words", binary=True))


@pytest.mark.parametrize("content,message", [(b"text\x00\x01\x02 more", "looks binary, not text \\(a NUL byte at "
                                                                          "offset 4\\)"),
                                             (b"ok \xff\xfe bad", "is not UTF-8 text \\(byte 3")])
def test_byte_mode_refuses_binary_files_unless_told(tmp_path, content, message):
    path = write(tmp_path / "b.bin", content * 50)
    with pytest.raises(CorpusError, match=message + ".*set data.binary: true to model its raw bytes anyway"):
        load_corpus(DataConfig(path=str(path)))
    assert len(load_corpus(DataConfig(path=str(path), binary=True)).train) > 0


def test_a_character_cut_by_max_bytes_is_not_an_error(tmp_path):
    path = write(tmp_path / "t.txt", "naïve café ".encode() * 100)
    for mode in ("bytes", "words"):
        assert len(load_corpus(DataConfig(path=str(path), max_bytes=24, tokenizer=mode, eval_fraction=0.5)).train)


def test_an_unreachable_hub_dataset_says_what_to_do(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(CorpusError, match="Could not load the Hugging Face dataset 'enwik8'.*give the files as"):
        load_corpus(DataConfig(dataset="enwik8"))


def test_window_batches_split_one_global_batch_across_ranks():
    corpus = data.Corpus(torch.arange(1000) % 256, torch.arange(300) % 256, 256, "byte", "t")
    batches = WindowBatches(corpus, seq_len=10, seed=3)
    whole = batches.train_batch(5, 1, rows=4)
    assert torch.equal(torch.cat([batches.train_batch(5, 1, 2, rank, 2) for rank in range(2)]), whole)
    one_rank = batches.eval_batches(rows=4, count=3)
    two_ranks = [batches.eval_batches(2, 3, rank, 2) for rank in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([two_ranks[0][i], two_ranks[1][i]]), one_rank[i])


def test_stream_batches_continue_each_row_where_the_last_segment_ended():
    corpus = data.Corpus(torch.arange(400, dtype=torch.int32), torch.arange(200, dtype=torch.int32), 400, "token", "t")
    streams = StreamBatches(corpus, seg_len=8, eval_seg_len=5, global_rows=4, eval_global_rows=4)
    first, second = streams.train_batch(0, rank=1, rows=2), streams.train_batch(1, rank=1, rows=2)
    assert first.shape == (2, 9) and first.dtype == torch.int64
    assert torch.equal(first[:, -1], second[:, 0]), "the next segment starts where this one's inputs end"
    assert torch.equal(first[:, 0], torch.tensor([200, 300])), "rank 1 holds global streams 2 and 3"
    assert torch.equal(streams.train_batch(12, 1, 2), first), "a stream wraps after its last full segment"
    evals = streams.eval_batches(rank=0, rows=2, count=None)
    assert len(evals) == 9 and torch.equal(evals[1][:, 0], evals[0][:, -1])
    with pytest.raises(CorpusError, match="fewer than a segment"):
        StreamBatches(corpus, seg_len=120, eval_seg_len=5, global_rows=4, eval_global_rows=4)
