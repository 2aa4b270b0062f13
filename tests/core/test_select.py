import pytest
import torch

from core.errors import SpecError
from core.select import keep_count, masks_from_scores, top_k_indices, top_k_mask


def sorted_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: a stable descending sort, the first k marked."""
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return mask


def test_top_k_mask_equals_a_stable_sort_with_many_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        flat = torch.randint(0, 4, (n,), generator=gen).double()  # many ties
        for k in range(n + 1):
            assert torch.equal(top_k_mask(flat, k), sorted_mask(flat, k)), (flat, k)


def test_top_k_mask_large_and_negative_scores():
    gen = torch.Generator().manual_seed(1)
    flat = torch.rand(10_000, generator=gen, dtype=torch.float64)
    flat[::7] = -1.0  # SynFlow's pruned weights
    for k in (1, 1234, 5000, 9000, 9999):
        assert torch.equal(top_k_mask(flat, k), sorted_mask(flat, k))


def test_top_k_indices_ascending():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])
    assert top_k_indices(scores, 2).tolist() == [1, 2]
    assert top_k_indices(scores, 4).tolist() == [0, 1, 2, 4]


def test_global_ties_go_to_the_earlier_layer():
    scores = {"b": torch.ones(2, 2), "a": torch.ones(3)}
    masks = masks_from_scores(scores, 0.5, scope="global")  # keep round(0.5 * 7) = 4
    assert masks["b"].all() and masks["a"].tolist() == [False, False, False]
    assert keep_count(7, 0.5) == 4


def test_errors():
    with pytest.raises(SpecError):
        masks_from_scores({"a": torch.tensor([float("nan")])}, 0.5)
    with pytest.raises(SpecError):
        masks_from_scores({"a": torch.ones(3)}, 1.0)
    with pytest.raises(SpecError):
        masks_from_scores({"a": torch.ones(3)}, 0.5, scope="per-block")
