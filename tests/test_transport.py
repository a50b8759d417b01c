"""Solvers against POT on small rectangular problems."""
import numpy as np
import ot
import pytest
import torch

from otcompress import transport
from otcompress.errors import InvalidOptionError, SolverError


def _problem(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(m, 5, generator=g), torch.randn(n, 5, generator=g)
    cost = transport.normalise_cost(transport.euclidean_cost(x, y))
    mu = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    nu = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return mu / mu.sum(), nu / nu.sum(), cost


@pytest.mark.parametrize("m,n", [(12, 7), (7, 12), (20, 20)])
def test_emd_matches_pot(m, n):
    mu, nu, cost = _problem(m, n)
    r = transport.emd(mu, nu, cost)
    ref = ot.emd2(mu.numpy(), nu.numpy(), cost.numpy())
    assert r.cost == pytest.approx(ref, rel=1e-9)
    assert r.marginal_error < 1e-9


@pytest.mark.parametrize("reg", [0.5, 0.05, 0.002])
@pytest.mark.parametrize("m,n", [(12, 7), (30, 50)])
def test_sinkhorn_matches_pot(m, n, reg):
    mu, nu, cost = _problem(m, n, seed=1)
    r = transport.sinkhorn(mu, nu, cost, reg, tol=1e-9, max_iter=100000)
    ref = ot.sinkhorn(mu.numpy(), nu.numpy(), cost.numpy(), reg, method="sinkhorn_log",
                      numItermax=100000, stopThr=1e-12)
    assert r.marginal_error < 1e-8
    np.testing.assert_allclose(r.plan.numpy(), ref, atol=1e-8)
    assert torch.allclose(r.plan.sum(1), mu, atol=1e-8) and torch.allclose(r.plan.sum(0), nu, atol=1e-8)


def test_small_reg_uses_log_domain_and_tends_to_emd():
    mu, nu, cost = _problem(15, 9, seed=2)
    r = transport.sinkhorn(mu, nu, cost, 1e-4, max_iter=100000)
    assert r.method == "sinkhorn-log"
    assert torch.isfinite(r.plan).all()
    assert r.cost == pytest.approx(transport.emd(mu, nu, cost).cost, abs=2e-3)


def test_large_reg_tends_to_flat_map():
    mu, nu, cost = _problem(6, 4)
    r = transport.sinkhorn(mu, nu, cost, 1e4)
    assert torch.allclose(r.plan, torch.outer(mu, nu), atol=1e-6)


def test_nonconvergence_is_a_clear_error():
    mu, nu, cost = _problem(40, 30)
    with pytest.raises(SolverError, match=r"reg=0\.001.*did not converge"):
        transport.sinkhorn(mu, nu, cost, 1e-3, max_iter=3)


@pytest.mark.parametrize("reg", [0, -1.0])
def test_bad_reg(reg):
    mu, nu, cost = _problem(4, 3)
    with pytest.raises(InvalidOptionError, match="reg > 0"):
        transport.sinkhorn(mu, nu, cost, reg)


def test_rescalings():
    mu, nu, cost = _problem(9, 4)
    plan = transport.emd(mu, nu, cost).plan
    assert torch.allclose(transport.row_stochastic(plan).sum(1), torch.ones(9, dtype=torch.float64))
    assert torch.allclose(transport.column_stochastic(plan).sum(0), torch.ones(4, dtype=torch.float64))
