"""Text to token ids for the corpus cache: Transformer-XL's word vocabulary, or a Hugging Face tokenizer.

Both read a split line by line (split_readers.text_lines) and give lists of ids, so a
split of any size is tokenised in a bounded amount of memory.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from ds_topkast.lm.data.corpus_sources import CorpusError, Split
from ds_topkast.lm.data.split_readers import text_lines

Encoder = Callable[[Split], Iterator[list[int]]]


class WordVocabulary:
    """Transformer-XL's word vocabulary: <eos> first, then the train split's words by falling count.

    A line is its whitespace-separated words and <eos>, as the reference's `for line in
    f: line.strip().split() + ['<eos>']` reads it. Words unseen in training map to <unk>,
    which WikiText already holds as a word; a corpus without one gets it last.
    """

    def __init__(self, counts: Counter):
        self.words = ["<eos>", *(word for word, _ in counts.most_common() if word != "<eos>")]
        if "<unk>" not in counts:
            self.words.append("<unk>")
        self.ids = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def of_lines(cls, lines: Iterator[str]) -> "WordVocabulary":
        counts = Counter()
        for line in lines:
            counts.update(line.split())
        return cls(counts)

    def encode_line(self, line: str) -> list[int]:
        unk = self.ids["<unk>"]
        return [self.ids.get(word, unk) for word in line.split()] + [0]


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # offline, unknown name, broken folder: all end the same way for the user
        raise CorpusError(f"Could not load the tokenizer {name!r}: {type(err).__name__}: {err}. Give a local "
                          "tokenizer folder, 'bytes' or 'words'.") from None


def _batched_lines(lines: Iterator[str], size: int = 1 << 20) -> Iterator[str]:
    """Whole lines joined into texts of about `size` characters, so a tokenizer sees no cut line."""
    batch, length = [], 0
    for line in lines:
        batch.append(line)
        length += len(line)
        if length >= size:
            yield "".join(batch)
            batch, length = [], 0
    if batch:
        yield "".join(batch)


def word_encoder(train: Split, source: str) -> tuple[WordVocabulary, Encoder]:
    """The train split's word vocabulary, and the encoder of any split by it."""
    vocab = WordVocabulary.of_lines(text_lines(train, source))
    return vocab, lambda split: map(vocab.encode_line, text_lines(split, source))


def tokenizer_encoder(name: str, source: str) -> tuple[int, Encoder]:
    """A Hugging Face tokenizer's vocabulary size (its largest id + 1, added tokens included) and its encoder."""
    tokenizer = _load_tokenizer(name)
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)

    def encode(split: Split) -> Iterator[list[int]]:
        for text in _batched_lines(text_lines(split, source)):
            yield tokenizer(text, add_special_tokens=False)["input_ids"]

    return vocab_size, encode
