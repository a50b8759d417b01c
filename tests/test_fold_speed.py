"""The k-means speed-ups in otcompress/fold.py change no result: the column
argmin, the blocked Gram matrix and the Gram-based Lloyd steps against plain
references (issue 16, item 4)."""
import torch

from otcompress import fold


def test_argmin_down_columns_is_torch_argmin_with_its_ties():
    g = torch.Generator().manual_seed(0)
    for k, m in [(7, 14), (63, 100), (64, 100), (65, 33), (300, 500), (2431, 97)]:
        for s in (torch.randn(k, m, generator=g), torch.randint(0, 3, (k, m), generator=g).float()):
            assert torch.equal(fold._argmin_columns(s), s.argmin(0))
            assert torch.equal(fold._argmin_rows(s.T), s.argmin(0))  # a transposed view goes down columns
    s = torch.zeros(130, 5)
    s[[3, 129], 2] = s[[40, 41], 4] = -1  # equal minima in two blocks / in one: the first wins
    assert fold._argmin_columns(s).tolist() == [0, 0, 3, 0, 40]


def test_blocked_gram_is_the_product_and_symmetric():
    g = torch.Generator().manual_seed(1)
    for a in (torch.randn(700, 90, generator=g), torch.randn(90, 1001, generator=g).T, torch.randn(100, 5)):
        got = fold._gram(a)
        assert torch.equal(got, got.T)
        assert torch.allclose(got, a @ a.T, rtol=1e-5, atol=1e-3)


def _reference_lloyd(x, seeds, w, max_iter=100):
    """Weighted Lloyd in float64 from explicit centres."""
    x, w = x.double(), w.double()
    centres, labels = x[seeds], None
    for _ in range(max_iter):
        new = torch.cdist(x, centres).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        one = torch.zeros(len(seeds), x.shape[0], dtype=torch.float64)
        one[labels, torch.arange(x.shape[0])] = w
        centres = one @ x / one.sum(1, keepdim=True)
    return labels


def test_gram_lloyd_matches_explicit_centres():
    """Large-layer path (Gram rows summed per cluster, weighted, reused
    buffers, argmin down columns) against explicit weighted centres from the
    same seeds, over several restarts sharing one `_Distances`."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 24, generator=g) * torch.rand(400, 1, generator=g)
    x = x - x.mean(0, keepdim=True)
    w = torch.rand(400, generator=g, dtype=torch.float64) + 0.1
    rows = fold._Distances(x)
    rows.weigh(w)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        seeds = fold._kmeans_pp(rows, 150, gen, w)
        labels, _ = fold._lloyd(rows, seeds, 100, w)
        assert torch.equal(labels, _reference_lloyd(x, seeds, w))


def test_slot_shares_of_a_one_dimensional_tensor_are_per_unit():
    """A bias or norm gain (1-D, its only axis the unit axis) gives each unit
    its own share: torch's sum over no dimensions would sum everything."""
    from otcompress import fold
    t = torch.tensor([3.0, 0.0, 4.0])
    assert torch.allclose(fold.slot_shares([(t, 0)]), torch.tensor([0.36, 0.0, 0.64], dtype=torch.float64))
