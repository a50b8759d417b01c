"""Solvers against POT on small rectangular problems, random and structured
(each anchor unit has near duplicates among the parent's, as for widened,
permuted or fine-tuned parents), plus the convergence contract: a plan that
misses `tol` is never accepted silently."""
import math
import warnings

import numpy as np
import ot
import pytest
import torch

from otcompress import transport
from otcompress.errors import InvalidOptionError, SolverError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _problem(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(m, 5, generator=g), torch.randn(n, 5, generator=g)
    cost = transport.normalise_cost(transport.euclidean_cost(x, y))
    mu = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    nu = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return mu / mu.sum(), nu / nu.sum(), cost


def _structured(n, copies=2, d=128, noise=0.1, seed=0):
    """Every anchor unit `copies` times among the parent's, permuted, plus noise;
    max-normalised Euclidean cost, uniform marginals (issue 8's synthetic case,
    scaled down: plain Sinkhorn needs ~9000 sweeps at reg 0.05)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=g)
    x = y.repeat(copies, 1)[torch.randperm(copies * n, generator=g)]
    x = x + noise * torch.randn(x.shape, generator=g)
    cost = transport.normalise_cost(transport.euclidean_cost(x, y))
    return transport.uniform(copies * n), transport.uniform(n), cost


def _pot_sinkhorn(mu, nu, cost, reg, method="sinkhorn", iterations=20000, check=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT may not meet stopThr; the tests check its plan's error
        plan = ot.sinkhorn(mu.numpy(), nu.numpy(), cost.double().numpy(), reg, method=method,
                           numItermax=iterations, stopThr=1e-13)
    if check:
        assert transport.marginal_error(torch.from_numpy(plan), mu, nu) < 1e-9  # a reference worth comparing to
    return plan


def _assert_marginals(r, mu, nu, atol):
    assert torch.allclose(r.plan.sum(1), mu.to(r.plan), atol=atol)
    assert torch.allclose(r.plan.sum(0), nu.to(r.plan), atol=atol)


# --------------------------------------------------------------------------- EMD


@pytest.mark.parametrize("m,n", [(12, 7), (7, 12), (20, 20)])
def test_emd_matches_pot(m, n):
    mu, nu, cost = _problem(m, n)
    r = transport.emd(mu, nu, cost)
    ref = ot.emd2(mu.numpy(), nu.numpy(), cost.numpy())
    assert r.cost == pytest.approx(ref, rel=1e-9)
    assert r.marginal_error < 1e-9
    assert r.converged and r.stats()["converged"]


def test_emd_float32_cost_plan_on_cost_device():
    mu, nu, cost = _problem(9, 6)
    r = transport.emd(mu, nu, cost.float())
    assert r.plan.device == cost.device and r.plan.dtype == torch.float64
    assert r.cost == pytest.approx(ot.emd2(mu.numpy(), nu.numpy(), cost.float().double().numpy()), rel=1e-6)


# --------------------------------------------------------------------------- Sinkhorn vs POT


@pytest.mark.parametrize("m,n,reg", [(12, 7, 0.5), (12, 7, 0.05), (12, 7, 0.002),
                                     (30, 50, 0.5), (30, 50, 0.05), (30, 50, 0.005)])
def test_sinkhorn_matches_pot_random(m, n, reg):
    mu, nu, cost = _problem(m, n, seed=1)
    r = transport.sinkhorn(mu, nu, cost, reg, tol=1e-9, max_iter=100000)
    ref = _pot_sinkhorn(mu, nu, cost, reg, method="sinkhorn_log")
    assert r.converged and r.marginal_error < 1e-9
    np.testing.assert_allclose(r.plan.numpy(), ref, atol=1e-8)
    _assert_marginals(r, mu, nu, 1e-8)
    assert r.cost == pytest.approx(float((ref * cost.numpy()).sum()), rel=1e-7)


def test_sinkhorn_matches_pot_structured():
    mu, nu, cost = _structured(64)
    r = transport.sinkhorn(mu, nu, cost, 0.08, tol=1e-10)
    ref = _pot_sinkhorn(mu, nu, cost, 0.08)  # POT's plain iterations
    assert r.converged and r.marginal_error < 1e-10
    _assert_marginals(r, mu, nu, 1e-11)
    np.testing.assert_allclose(r.plan.numpy(), ref, atol=1e-9 / len(mu))
    assert r.cost == pytest.approx(float((ref * cost.numpy()).sum()), rel=1e-9)
    # soft, so no cheaper than the exact optimum
    assert r.cost >= ot.emd2(mu.numpy(), nu.numpy(), cost.numpy()) - 1e-12


def test_sinkhorn_is_the_limit_of_pots_iterations_on_a_hard_structured_cost():
    """At reg 0.05 POT's plain iterations crawl (marginal error ~3e-7 after
    20000); they approach our 1e-10 plan at the rate their error falls."""
    mu, nu, cost = _structured(64)
    r = transport.sinkhorn(mu, nu, cost, 0.05, tol=1e-10)
    assert r.converged and r.marginal_error < 1e-10
    _assert_marginals(r, mu, nu, 1e-11)
    gaps = []
    for iterations in (2000, 20000):
        ref = _pot_sinkhorn(mu, nu, cost, 0.05, iterations=iterations, check=False)
        ref_err = transport.marginal_error(torch.from_numpy(ref), mu, nu)
        gap = float(np.abs(r.plan.numpy() - ref).max()) * len(mu)
        assert gap <= 10 * ref_err
        assert abs(r.cost - float((ref * cost.numpy()).sum())) <= 10 * ref_err
        gaps.append(gap)
    assert gaps[1] < gaps[0] / 3  # POT converges towards our plan


def test_structured_cost_needs_acceleration():
    """The reason for Anderson: plain Sinkhorn crawls on duplicate structure."""
    mu, nu, cost = _structured(64)
    plain = transport.sinkhorn(mu, nu, cost, 0.05, anderson=0, max_iter=20000)
    fast = transport.sinkhorn(mu, nu, cost, 0.05)
    assert plain.iterations > 3000  # the problem is hard for plain sweeps...
    assert fast.iterations <= 30  # ...and easy for accelerated ones
    assert fast.converged and plain.converged
    assert fast.marginal_error <= 1e-6 and plain.marginal_error <= 1e-6
    assert torch.allclose(fast.plan, plain.plan, atol=1e-6 / len(mu))


@pytest.mark.parametrize("seed", range(6))
def test_acceleration_never_much_worse_than_plain(seed):
    """Random shapes, marginals and regs: the safeguarded solver converges
    whenever plain Sinkhorn does, in at most a few more sweeps."""
    g = torch.Generator().manual_seed(100 + seed)
    m, n = (int(k) for k in torch.randint(5, 60, (2,), generator=g))
    mu, nu, cost = _problem(m, n, seed=100 + seed)
    reg = float(10 ** torch.empty(1).uniform_(-2.5, -0.5, generator=g))
    plain = transport.sinkhorn(mu, nu, cost, reg, anderson=0, max_iter=20000, on_unconverged="warn")
    fast = transport.sinkhorn(mu, nu, cost, reg, max_iter=20000)
    assert fast.converged
    assert fast.iterations <= plain.iterations + 10


def test_small_reg_uses_log_domain_and_tends_to_emd():
    mu, nu, cost = _problem(15, 9, seed=2)
    r = transport.sinkhorn(mu, nu, cost, 1e-4, max_iter=100000)
    assert r.method == "sinkhorn-log"
    assert torch.isfinite(r.plan).all()
    assert r.cost == pytest.approx(transport.emd(mu, nu, cost).cost, abs=2e-3)


def test_log_domain_matches_pot_structured():
    mu, nu, cost = _structured(32, noise=0.3)
    reg = 0.004  # (max - min) / reg > 200: the log domain
    r = transport.sinkhorn(mu, nu, cost, reg, tol=1e-10)
    assert r.method == "sinkhorn-log" and r.converged
    ref = _pot_sinkhorn(mu, nu, cost, reg, method="sinkhorn_log")
    np.testing.assert_allclose(r.plan.numpy(), ref, atol=1e-9 / len(mu))


def test_large_reg_tends_to_flat_map():
    mu, nu, cost = _problem(6, 4)
    r = transport.sinkhorn(mu, nu, cost, 1e4)
    assert torch.allclose(r.plan, torch.outer(mu, nu), atol=1e-6)


# --------------------------------------------------------------------------- the report


def test_stats_report_convergence_and_relative_entropy():
    mu, nu, cost = _structured(32)
    s = transport.sinkhorn(mu, nu, cost, 0.05).stats()
    for key in ("converged", "iterations", "marginal_error", "relative_entropy", "entropy", "cost", "shape"):
        assert key in s
    assert s["converged"] is True and s["iterations"] >= 1 and s["marginal_error"] <= 1e-6
    # near-hard here: each anchor unit takes its two copies, entropy ~ log(2n)
    assert s["relative_entropy"] == pytest.approx(math.log(64) / math.log(64 * 32), abs=0.02)
    flat = transport.sinkhorn(mu, nu, cost, 1e4).stats()
    assert flat["relative_entropy"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("reg", [0.05, 0.003])
def test_entropy_from_potentials_equals_plan_entropy(reg):
    mu, nu, cost = _problem(25, 40, seed=3)
    r = transport.sinkhorn(mu, nu, cost, reg, tol=1e-10, max_iter=100000)
    assert r.entropy == pytest.approx(float(torch.special.entr(r.plan).sum()), rel=1e-10, abs=1e-12)


# --------------------------------------------------------------------------- never accept silently


def test_nonconvergence_raises_by_default():
    mu, nu, cost = _problem(40, 30)
    with pytest.raises(SolverError, match=r"reg=0\.001.*did not converge.*marginal error"):
        transport.sinkhorn(mu, nu, cost, 1e-3, max_iter=3)
    with pytest.raises(SolverError, match=r"reg=0\.001"):
        transport.solve(mu, nu, cost, solver="sinkhorn", reg=1e-3, max_iter=3, tol=1e-6)


def test_nonconvergence_can_warn_and_is_flagged():
    mu, nu, cost = _problem(40, 30)
    with pytest.warns(transport.UnconvergedWarning, match=r"reg=0\.001.*did not converge"):
        r = transport.solve(mu, nu, cost, solver="sinkhorn", reg=1e-3, max_iter=3, on_unconverged="warn")
    assert r.converged is False and r.iterations == 3 and r.marginal_error > 1e-6
    s = r.stats()
    assert s["converged"] is False and s["marginal_error"] == r.marginal_error


def test_an_error_just_above_tol_is_not_accepted():
    """The old solver accepted up to 100x tol; now tol means tol."""
    mu, nu, cost = _structured(64)
    loose = transport.sinkhorn(mu, nu, cost, 0.05, anderson=0, max_iter=20000, tol=1e-4)
    assert 1e-6 < loose.marginal_error <= 1e-4  # within the old 100x slack of tol=1e-6
    with pytest.raises(SolverError, match="did not converge"):
        transport.sinkhorn(mu, nu, cost, 0.05, anderson=0, max_iter=loose.iterations, tol=1e-6)


@pytest.mark.parametrize("bad", ["ignore", None, "Raise"])
def test_bad_on_unconverged(bad):
    mu, nu, cost = _problem(4, 3)
    with pytest.raises(InvalidOptionError, match="on_unconverged"):
        transport.sinkhorn(mu, nu, cost, 0.1, on_unconverged=bad)
    with pytest.raises(InvalidOptionError, match="on_unconverged"):
        transport.solve(mu, nu, cost, solver="emd", reg=0.1, on_unconverged=bad)


@pytest.mark.parametrize("reg", [0, -1.0])
def test_bad_reg(reg):
    mu, nu, cost = _problem(4, 3)
    with pytest.raises(InvalidOptionError, match="reg > 0"):
        transport.sinkhorn(mu, nu, cost, reg)


def test_unbalanced_marginals_are_refused():
    mu, nu, cost = _problem(5, 4)
    with pytest.raises(InvalidOptionError, match="total mass"):
        transport.sinkhorn(mu, 2 * nu, cost, 0.1)


def test_zero_mass_units_get_empty_rows_and_columns():
    mu, nu, cost = _problem(8, 6, seed=4)
    mu = mu.clone()
    nu = nu.clone()
    mu[2], nu[5] = 0.0, 0.0
    mu, nu = mu / mu.sum(), nu / nu.sum()
    r = transport.sinkhorn(mu, nu, cost, 0.05, tol=1e-10)
    assert r.converged and float(r.plan[2].abs().sum()) == 0.0 and float(r.plan[:, 5].abs().sum()) == 0.0
    ref = _pot_sinkhorn(mu[torch.arange(8) != 2], nu[:5], cost[torch.arange(8) != 2][:, :5], 0.05, "sinkhorn_log")
    np.testing.assert_allclose(r.plan[torch.arange(8) != 2][:, :5].numpy(), ref, atol=1e-9)


# --------------------------------------------------------------------------- device and dtype


def test_uniform_device_and_dtype():
    u = transport.uniform(4)
    assert u.dtype == torch.float64 and u.device.type == "cpu" and float(u.sum()) == pytest.approx(1.0)
    assert transport.uniform(3, device="cpu", dtype=torch.float32).dtype == torch.float32


def test_float32_cost_float64_compute_by_default():
    mu, nu, cost = _structured(32)
    r = transport.sinkhorn(mu.float(), nu.float(), cost.float(), 0.05)
    assert r.plan.device == cost.device and r.plan.dtype == torch.float64
    assert r.converged and r.marginal_error <= 1e-6
    r32 = transport.sinkhorn(mu, nu, cost.float(), 0.05, dtype=torch.float32, tol=1e-5)
    assert r32.plan.dtype == torch.float32 and r32.converged
    assert torch.allclose(r32.plan.double(), r.plan, atol=1e-5 / len(mu))


@CUDA
@pytest.mark.parametrize("reg", [0.05, 0.003])
def test_cuda_plan_stays_on_device_and_matches_cpu(reg):
    mu, nu, cost = _structured(64, noise=0.3)
    dev = torch.device("cuda")
    cpu = transport.sinkhorn(mu, nu, cost, reg, tol=1e-9)
    # CPU marginals (as transport.uniform gives by default) meet a CUDA cost
    gpu = transport.solve(mu, nu, cost.float().to(dev), solver="sinkhorn", reg=reg, tol=1e-9)
    assert gpu.plan.device.type == "cuda" and gpu.plan.dtype == torch.float64 and gpu.converged
    assert gpu.method == cpu.method
    assert torch.allclose(gpu.plan.cpu(), cpu.plan, atol=1e-6 / len(mu))
    e = transport.solve(transport.uniform(len(mu), device=dev), transport.uniform(len(nu), device=dev),
                        cost.to(dev), solver="emd", reg=reg)
    assert e.plan.device.type == "cuda" and e.converged
    assert e.cost == pytest.approx(ot.emd2(mu.numpy(), nu.numpy(), cost.numpy()), rel=1e-9)


def test_rescalings():
    mu, nu, cost = _problem(9, 4)
    plan = transport.emd(mu, nu, cost).plan
    assert torch.allclose(transport.row_stochastic(plan).sum(1), torch.ones(9, dtype=torch.float64))
    assert torch.allclose(transport.column_stochastic(plan).sum(0), torch.ones(4, dtype=torch.float64))
