"""The bucket plan both ends of a weight transfer compute (no vLLM, no Ray)."""
import pytest

from r1ray.actors.weight_transfer import bucket_plan


def test_buckets_are_bounded_and_keep_order():
    sizes = [4, 4, 4, 10, 1, 1]
    assert bucket_plan(sizes, 8) == [[0, 1], [2], [3], [4, 5]]  # the 10-byte tensor goes alone
    assert [i for b in bucket_plan(sizes, 3) for i in b] == list(range(6))
    with pytest.raises(ValueError):
        bucket_plan(sizes, 0)


def test_a_layer_stays_in_one_bucket_when_it_fits():
    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a",
             "model.layers.1.b", "model.norm.weight"]
    sizes = [3, 2, 2, 2, 2, 1]
    # by size alone the first layer would be split across buckets
    assert bucket_plan(sizes, 5) == [[0, 1], [2, 3], [4, 5]]
    assert bucket_plan(sizes, 5, names) == [[0], [1, 2], [3, 4, 5]]
    # a layer larger than a bucket is split tensor by tensor
    assert bucket_plan([1, 6, 6, 1], 8, ["e", "m.layers.0.a", "m.layers.0.b", "n"]) == [[0, 1], [2, 3]]
