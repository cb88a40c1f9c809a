"""Corpora: the standard splits (never from file order), tokenisers, hub rows, and the prepared, mapped cache."""
import numpy as np
import pytest

from ds_topkast.lm.data import corpus_cache, corpus_sources, hub_corpora, split_readers
from ds_topkast.lm.data.corpus_cache import open_corpus
from ds_topkast.lm.data.corpus_sources import CorpusError, DataConfig


def write(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def load(tmp_path, **fields):
    return open_corpus(DataConfig(cache_dir=str(tmp_path / "cache"), **fields))


def text(array) -> bytes:
    return bytes(np.asarray(array).tolist())


def wikitext_folder(root, suffix="tokens"):
    """A WikiText-format folder whose splits each hold their own marker word."""
    for split in ("train", "valid", "test"):
        write(root / f"wiki.{split}.{suffix}", f" = {split} title = \n \n the {split}marker word .\n".encode() * 40)
    return root


def test_a_wikitext_folder_splits_by_file_name_and_training_never_sees_held_out_text(tmp_path):
    """Sorted order would be test, train, valid: the old held-out tail trained on the test file."""
    for suffix in ("tokens", "raw"):
        folder = wikitext_folder(tmp_path / suffix, suffix)
        corpus = load(tmp_path, path=str(folder))
        for split in ("train", "valid", "test"):
            assert corpus.files[split] == [str(folder / f"wiki.{split}.{suffix}")]
            words = set(text(corpus.splits[split]).decode().split())
            assert {f"{other}marker" for other in ("train", "valid", "test")} & words == {f"{split}marker"}
        words = load(tmp_path, path=str(folder), tokenizer="words")
        assert {"trainmarker", "validmarker", "testmarker"} & set((words.folder / "vocab.txt").read_text().split()) \
            == {"trainmarker"}, "the word vocabulary is the train split's"


def test_train_valid_test_files_by_name_and_by_explicit_paths(tmp_path):
    folder = tmp_path / "named"
    for name in ("train.txt", "validation.txt", "test.txt"):
        write(folder / name, name.encode() * 10)
    by_name = load(tmp_path, path=str(folder))
    assert text(by_name.valid) == b"validation.txt" * 10 and text(by_name.test) == b"test.txt" * 10
    explicit = load(tmp_path, train=str(folder / "t*n.txt"), valid=str(folder / "test.txt"),
                    test=str(folder / "validation.txt"))
    assert text(explicit.train) == b"train.txt" * 10 and text(explicit.valid) == b"test.txt" * 10
    write(folder / "train.old.txt", b"x")
    with pytest.raises(CorpusError, match="not exactly one each for train"):
        load(tmp_path, path=str(folder))


def test_enwik8_takes_the_standard_split_whatever_the_file_is_called(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_sources, "ENWIK8_SPLIT", (900, 50, 50))  # the real one is 90M / 5M / 5M bytes
    content = bytes(range(256)) * 4  # not text: enwik8 is modelled as raw bytes
    for name, fields in (("enwik8", {}), ("enwik8.txt", {}), ("data.raw", {"dataset": "enwik8"})):
        corpus = load(tmp_path, path=str(write(tmp_path / name, content[:1000])), **fields)
        assert (text(corpus.train), text(corpus.valid), text(corpus.test)) == \
            (content[:900], content[900:950], content[950:1000])
    with pytest.raises(CorpusError, match="splits are not known; set data.held_out.*set data.dataset: enwik8"):
        load(tmp_path, path=str(tmp_path / "data.raw"))
    for wrong in (content[:999], content[:1001]):
        with pytest.raises(CorpusError, match=f"has {len(wrong)} bytes, not enwik8's 1000"):
            load(tmp_path, path=str(write(tmp_path / "wrong", wrong)), dataset="enwik8")
    prepared = tmp_path / "txl_data"
    for split in ("train", "valid", "test"):  # Transformer-XL's getdata.sh output: bytes written as numbers
        write(prepared / f"{split}.txt", b"60 109 101 100 105 97 119\n32 32 60\n" * 20)
    with pytest.raises(CorpusError, match="Transformer-XL's prepared enwik8.*raw, unzipped enwik8"):
        load(tmp_path, path=str(prepared))


def test_other_corpora_need_an_explicit_held_out_fraction(tmp_path):
    write(tmp_path / "c" / "b.txt", b"second ")
    write(tmp_path / "c" / "a.txt", b"first ")
    write(tmp_path / "c" / "sub" / "z.md", b"third....!")
    with pytest.raises(CorpusError, match="set data.held_out"):
        load(tmp_path, path=str(tmp_path / "c"))
    corpus = load(tmp_path, path=str(tmp_path / "c"), held_out=0.2)  # 23 bytes: valid and test 4 each, at the end
    assert (text(corpus.train), text(corpus.valid), text(corpus.test)) == (b"first second th", b"ird.", b"...!")
    assert corpus.files["valid"] == [f"{tmp_path / 'c' / 'sub' / 'z.md'}[bytes 2:6]"]


def test_the_default_corpus_is_the_standard_library_source_with_its_own_held_out_split(tmp_path):
    corpus = load(tmp_path, max_bytes=50_000)
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 50_000
    assert len(corpus.valid) == len(corpus.test) == 2_500
    assert b"import" in text(corpus.train[:5000])


@pytest.mark.parametrize("path,message", [("missing.txt", "does not exist"), ("*.nothing", "does not exist"),
                                          ("empty_dir", "holds no files"), ("empty.txt", "split of corpus .* is empty")])
def test_missing_and_empty_corpora_fail_with_the_fix(tmp_path, path, message):
    (tmp_path / "empty_dir").mkdir()
    write(tmp_path / "empty.txt", b"")
    with pytest.raises(CorpusError, match=message):
        load(tmp_path, path=str(tmp_path / path), held_out=0.1)


def test_word_vocabulary_is_the_references(tmp_path):
    """<eos> ends every line (blank ones too); <unk> once; lines end only at \\n, \\r\\n or \\r; words by count."""
    lines = "b a <unk> a\r\n\nc\x0cb a\n"  # a form feed is whitespace, not a line end
    corpus = load(tmp_path, train=str(write(tmp_path / "t.txt", lines.encode())),
                  valid=str(write(tmp_path / "v.txt", b"a zebra\n")), test=str(tmp_path / "v.txt"), tokenizer="words")
    words = (corpus.folder / "vocab.txt").read_text().split("\n")[:-1]
    assert words == ["<eos>", "a", "b", "<unk>", "c"] and corpus.vocab_size == 5
    assert corpus.train.tolist() == [2, 1, 3, 1, 0, 0, 4, 2, 1, 0]
    assert corpus.valid.tolist() == [1, 3, 0], "an unseen word is <unk>"


def test_hub_wikitext_rows_become_the_lines_of_the_file(tmp_path, monkeypatch):
    """Rows keep their newline and blank lines are empty rows: joined with another newline, <eos> doubled."""
    import datasets

    folder = wikitext_folder(tmp_path / "wt")
    rows = {split: [line if line.strip() else "" for line in
                    (folder / f"wiki.{split}.tokens").read_text().splitlines(keepends=True)]
            for split in ("train", "valid", "test")}
    hub = datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": rows[split]})
                                for name, split in (("train", "train"), ("validation", "valid"), ("test", "test"))})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or hub)
    from_hub = load(tmp_path, dataset="wikitext-103", tokenizer="words")
    assert calls == [(("Salesforce/wikitext",), {"name": "wikitext-103-v1"})]
    from_files = load(tmp_path, path=str(folder), tokenizer="words")
    for split in ("train", "valid", "test"):
        assert from_hub.splits[split].tolist() == from_files.splits[split].tolist()
    assert from_hub.files["test"] == ["hf://Salesforce/wikitext name=wikitext-103-v1 test"]
    load(tmp_path, dataset="wikitext-103", tokenizer="words")
    assert len(calls) == 1, "the hub copy is kept: a second start needs no network"


def test_an_unreachable_hub_dataset_says_what_to_do(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(CorpusError, match="Could not load the Hugging Face dataset 'enwik8'.*data.path the raw"):
        load(tmp_path, dataset="enwik8")
    assert hub_corpora.hub_dataset("enwik8").arguments == {"revision": "refs/convert/parquet",
                                                           "data_dir": "enwik8-raw"}


def test_a_prepared_corpus_is_mapped_not_prepared_again_until_a_file_changes(tmp_path, monkeypatch):
    path = write(tmp_path / "t.txt", b"hello world moon " * 2000)
    monkeypatch.setattr(split_readers, "CHUNK", 1000)  # prepared in many chunks, as a corpus larger than RAM is
    first = load(tmp_path, path=str(path), held_out=0.1, tokenizer="words")
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint8
    prepared = []
    real = corpus_cache._prepare
    monkeypatch.setattr(corpus_cache, "_prepare", lambda *a: prepared.append(a) or real(*a))
    again = load(tmp_path, path=str(path), held_out=0.1, tokenizer="words")
    assert not prepared and again.folder == first.folder
    assert again.train.tolist() == first.train.tolist()
    write(tmp_path / "t.txt", b"hello world moon " * 2001)
    assert load(tmp_path, path=str(path), held_out=0.1, tokenizer="words").folder != first.folder and prepared


def test_a_local_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    corpus = load(tmp_path, path=str(write(tmp_path / "t.txt", b"hello world moon " * 20)),
                  tokenizer=str(tmp_path / "tok"), held_out=0.25)
    assert corpus.vocab_size == 3 and corpus.train[:3].tolist() == [1, 2, 0]


def test_text_modes_refuse_non_utf8_and_name_the_fix(tmp_path):
    binary = write(tmp_path / "b.bin", b"ok \xff\xfe bad")
    with pytest.raises(CorpusError, match="not UTF-8 text.*use data.tokenizer 'bytes'"):
        load(tmp_path, path=str(binary), tokenizer="words", held_out=0.1)
    with pytest.raises(CorpusError, match="binary applies to byte-level mode only"):
        load(tmp_path, path=str(binary), tokenizer="words", binary=True, held_out=0.1)


@pytest.mark.parametrize("content,message", [(b"text\x00\x01\x02 more", "looks binary, not text \\(a NUL byte at "
                                                                          "offset 4\\)"),
                                             (b"ok \xff\xfe bad", "is not UTF-8 text \\(byte 3")])
def test_byte_mode_refuses_binary_files_unless_told(tmp_path, content, message):
    path = write(tmp_path / "b.bin", content * 50)
    with pytest.raises(CorpusError, match=message + ".*set data.binary: true to model its raw bytes anyway"):
        load(tmp_path, path=str(path), held_out=0.1)
    assert len(load(tmp_path, path=str(path), binary=True, held_out=0.1).train) > 0


def test_a_character_cut_by_max_bytes_or_a_split_is_not_an_error(tmp_path):
    path = write(tmp_path / "t.txt", "naïve café ".encode() * 100)
    for mode in ("bytes", "words"):
        for max_bytes in (24, 25, 26, 27):
            assert len(load(tmp_path, path=str(path), max_bytes=max_bytes, tokenizer=mode, held_out=0.3).train)
