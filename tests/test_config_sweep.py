"""Every key a user types: a wrong type and every out-of-range value fail at start, naming the key.

The keys are enumerated from the config models themselves, so a key added later is
swept too: the "topkast" section with its dense_store and aio blocks, and the training
command's "train" section with its data block.
"""
import annotated_types
import pytest

from ds_topkast.config import AioConfig, DenseStoreConfig, TopKASTConfig, TopKASTConfigError
from ds_topkast.lm.data.corpus_sources import DataConfig
from ds_topkast.lm.train_config import TrainConfig, train_section

# (model, dotted path, how to nest one block of that model into what the user writes, validator)
BLOCKS = [
    (TopKASTConfig, "topkast", lambda block: block, TopKASTConfig.from_section),
    (DenseStoreConfig, "topkast.dense_store", lambda block: {"dense_store": block}, TopKASTConfig.from_section),
    (AioConfig, "topkast.dense_store.aio", lambda block: {"dense_store": {"aio": block}}, TopKASTConfig.from_section),
    (TrainConfig, "train", lambda block: {"train": block}, lambda cfg: train_section(cfg)),
    (DataConfig, "train.data", lambda block: {"train": {"data": block}}, lambda cfg: train_section(cfg)),
]


def wrong_type(annotation) -> object:
    """A JSON value no field of this annotation accepts, even with pydantic's lenient coercion."""
    text = str(annotation)
    if text.startswith("list"):
        return 5
    if text.startswith("dict"):
        return [1]
    return [[1]]


def out_of_range(metadata) -> list:
    values = []
    for bound in metadata:
        if isinstance(bound, annotated_types.Ge):
            values.append(bound.ge - 1 if isinstance(bound.ge, int) else bound.ge - 0.5)
        elif isinstance(bound, annotated_types.Gt):
            values.append(bound.gt)
        elif isinstance(bound, annotated_types.Lt):
            values.append(bound.lt)
        elif isinstance(bound, annotated_types.Le):
            values.append(bound.le + 1)
        elif isinstance(bound, annotated_types.MinLen):
            values.append([])
    return values


CASES = [(path, key, value, nest, validate)
         for model, path, nest, validate in BLOCKS
         for key, field in model.model_fields.items()
         for value in [wrong_type(field.annotation), *out_of_range(field.metadata)]]


@pytest.mark.parametrize("path,key,value,nest,validate", CASES, ids=[f"{c[0]}.{c[1]}={c[2]!r}" for c in CASES])
def test_a_bad_value_of_every_key_is_refused_naming_it(path, key, value, nest, validate):
    with pytest.raises(TopKASTConfigError) as err:
        validate(nest({key: value}))
    assert f"{path}.{key}" in str(err.value) and f"(got {value!r})" in str(err.value), str(err.value)

