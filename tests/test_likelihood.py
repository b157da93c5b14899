"""The IWAE log-likelihood estimator against marginal likelihoods known exactly.

Ground truth never comes from ``vaebench.scoring.likelihood``; it is computed here, in float64:

- linear-Gaussian decoder, p(z) = N(0, I), p(x|z,c,y) = N(Wz + b + m_c + s_y, sigma^2 I):
  log p(x) = log N(x; b + m_c + s_y, WW^T + sigma^2 I) (``MultivariateNormal``, summed over
  the uniform c where there is one), the exact posterior and the ELBO of a diagonal Gaussian
  q in closed form. W has orthonormal-times-scale columns and every m_c lies outside W's
  column space, so the exact posterior factorizes into a diagonal Gaussian and a categorical:
  with q equal to it every log-weight is log p(x), a check to float precision;
- Bernoulli decoder with a 1-D z (and optionally a uniform categorical c),
  p(x|z,c) = prod_j Bernoulli(sigmoid(a_j z + o_cj)): log p(x), the exact posterior's moments
  and the ELBO of any Gaussian q by trapezoid quadrature on a dense z grid (checked to sum
  p(x) to one over all binary images).

The statistical tests use an encoder that is deliberately not the exact posterior (mean
shifted by one posterior standard deviation, variance doubled, category logits halved), so
the bound's gap depends on K. All draws come from seeded generators: every test is
deterministic.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal

from vaebench.models.base import Posterior
from vaebench.scoring.likelihood import estimate_nll, iwae_log_likelihood, log_weights

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)

# the encoder the statistical tests use: q(z|x) = N(mean + SHIFT * sd, WIDEN * var) around the
# exact posterior's mean and variance, q(c|x) = softmax(TEMPER * exact posterior logits)
SHIFT, WIDEN, TEMPER = 1.0, 2.0, 0.5

# (mean, variance, category logits or None) of a Gaussian (and categorical) q, all float64
Moments = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def one_hot_offsets(c: torch.Tensor | None, offsets: torch.Tensor) -> torch.Tensor:
    """The offset rows picked by one-hot c (the only row when there is no categorical)."""
    return offsets[0] if c is None else c.to(F64) @ offsets


def binary_images(pixels: int) -> torch.Tensor:
    """All 2^pixels binary images, image i being i written in binary (pixel j: bit j)."""
    return (torch.arange(2**pixels)[:, None] >> torch.arange(pixels)) & 1


def diagonal_gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
    return -0.5 * ((z - mean) ** 2 / var + var.log() + LOG_2PI)


# --- ground truth: linear-Gaussian decoder ------------------------------------------------


@dataclass
class LinearGaussian:
    """p(z) = N(0, I_d), c uniform over ``category_means`` rows (if any), p(x|z,c,y) =
    N(Wz + b + m_c + s_y, sigma^2 I_D)."""

    weight: torch.Tensor  # (D, d), orthogonal columns
    bias: torch.Tensor  # (D,)
    sigma: float
    label_shift: torch.Tensor  # (labels, D): s_y
    category_means: torch.Tensor  # (C, D), orthogonal to W's columns; one zero row: no c

    @classmethod
    def make(cls, seed: int, categories: int = 0, z_dim: int = 2, x_dim: int = 5):
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(x_dim, x_dim, generator=g, dtype=F64))
        weight = basis[:, :z_dim] * torch.linspace(1.5, 0.8, z_dim, dtype=F64)
        complement = basis[:, z_dim:]
        coefficients = 2 * torch.randn(max(categories, 1), x_dim - z_dim, generator=g, dtype=F64)
        means = coefficients @ complement.T if categories else torch.zeros(1, x_dim, dtype=F64)
        return cls(
            weight=weight,
            bias=torch.randn(x_dim, generator=g, dtype=F64),
            sigma=0.5,
            label_shift=2 * torch.randn(3, x_dim, generator=g, dtype=F64),
            category_means=means,
        )

    @property
    def categories(self) -> int:
        return self.category_means.shape[0]

    def log_likelihood(self, mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log N(x; mean, sigma^2 I) per row: the estimator's ``log_likelihood`` here."""
        squares = ((x - mean) / self.sigma) ** 2
        return -0.5 * (squares + math.log(2 * math.pi * self.sigma**2)).sum(dim=1)

    def centre(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """x - b - s_y, float64."""
        shift = self.label_shift[y] if y is not None else 0.0
        return x.to(F64) - self.bias - shift

    def decode(self, z: torch.Tensor, c: torch.Tensor | None, y: torch.Tensor | None):
        shift = self.label_shift[y] if y is not None else 0.0
        return z @ self.weight.T + self.bias + shift + one_hot_offsets(c, self.category_means)

    @cached_property
    def marginal(self) -> MultivariateNormal:
        """N(0, WW^T + sigma^2 I): the law of x - b - m_c - s_y."""
        x_dim = self.weight.shape[0]
        cov = self.weight @ self.weight.T + self.sigma**2 * torch.eye(x_dim, dtype=F64)
        return MultivariateNormal(torch.zeros(x_dim, dtype=F64), covariance_matrix=cov)

    def log_px_given_c(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """log N(x; b + m_c + s_y, WW^T + sigma^2 I) for every c: shape (N, C)."""
        return self.marginal.log_prob(self.centre(x, y)[:, None, :] - self.category_means)

    def log_px(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        joint = self.log_px_given_c(x, y) - math.log(self.categories)
        return torch.logsumexp(joint, dim=1)

    def exact_posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Moments:
        """p(z|x) = N(var * W^T(x - b - s_y) / sigma^2, var) with var = 1 / (1 + |W_j|^2 /
        sigma^2) (W^T m_c = 0 and W^T W diagonal), and p(c|x) from log p(x|c)."""
        column_norms = self.weight.pow(2).sum(dim=0)
        var = 1 / (1 + column_norms / self.sigma**2)
        mean = var * (self.centre(x, y) @ self.weight) / self.sigma**2
        logits = self.log_px_given_c(x, y) if self.categories > 1 else None
        return mean, var.expand_as(mean), logits

    def elbo(self, x: torch.Tensor, y: torch.Tensor | None, q: Moments) -> torch.Tensor:
        """E_q[log p(x|z) + log p(z) - log q(z)] in closed form (no categorical)."""
        assert self.categories == 1
        mean, var, _ = q
        x_dim = self.weight.shape[0]
        residual = (self.centre(x, y) - mean @ self.weight.T).pow(2).sum(dim=1)
        spread = (var * self.weight.pow(2).sum(dim=0)).sum(dim=1)  # tr(W diag(var) W^T)
        expected_log_lik = -0.5 * (
            (residual + spread) / self.sigma**2 + x_dim * math.log(2 * math.pi * self.sigma**2)
        )
        expected_log_prior = -0.5 * (mean.pow(2) + var + LOG_2PI).sum(dim=1)
        entropy = 0.5 * (1 + LOG_2PI + var.log()).sum(dim=1)
        return expected_log_lik + expected_log_prior + entropy

    def sample(self, labels: torch.Tensor | None, seed: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.weight.shape[1], generator=g, dtype=F64)
        c = torch.randint(self.categories, (n,), generator=g)
        mean = self.decode(z, F.one_hot(c, self.categories), labels)
        noise = torch.randn(mean.shape, generator=g, dtype=F64)
        return (mean + self.sigma * noise).float()


# --- ground truth: Bernoulli decoder with a 1-D z, by quadrature --------------------------


@dataclass
class BernoulliLine:
    """p(z) = N(0, 1), c uniform over ``offsets`` rows, p(x|z,c) = prod_j
    Bernoulli(x_j; sigmoid(a_j z + o_cj)); one offset row means no categorical."""

    slopes: torch.Tensor  # (D,)
    offsets: torch.Tensor  # (C, D)
    grid: torch.Tensor  # quadrature nodes over z
    log_step: torch.Tensor  # log trapezoid weights at the nodes
    log_sigmoid: tuple[torch.Tensor, torch.Tensor]  # log sigmoid(+-logits) at (c, node, pixel)
    log_likelihood = None  # the estimator's default: Bernoulli pixels given as logits

    @classmethod
    def make(cls, seed: int, categories: int = 1, x_dim: int = 10):
        g = torch.Generator().manual_seed(seed)
        slopes = 1.5 * torch.randn(x_dim, generator=g, dtype=F64)
        offsets = 1.5 * torch.randn(categories, x_dim, generator=g, dtype=F64)
        # p(z) < 1e-31 beyond |z| = 12; every exact posterior's sd is over 0.49, the step 0.006
        grid = torch.linspace(-12, 12, 4001, dtype=F64)
        step = torch.full_like(grid, (grid[1] - grid[0]).item())
        step[[0, -1]] /= 2
        logits = grid[None, :, None] * slopes + offsets[:, None, :]
        log_sigmoid = (F.logsigmoid(logits), F.logsigmoid(-logits))
        return cls(slopes, offsets, grid, step.log(), log_sigmoid)

    @property
    def categories(self) -> int:
        return self.offsets.shape[0]

    def decode(self, z: torch.Tensor, c: torch.Tensor | None, y: torch.Tensor | None = None):
        return z * self.slopes + one_hot_offsets(c, self.offsets)

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z, c) at every (image, c, node): shape (N, C, G)."""
        x = x.to(F64)
        on, off = self.log_sigmoid
        log_lik = torch.einsum("nd,cgd->ncg", x, on) + torch.einsum("nd,cgd->ncg", 1 - x, off)
        log_prior = -0.5 * (self.grid.pow(2) + LOG_2PI) - math.log(self.categories)
        return log_lik + log_prior

    def log_px(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.logsumexp(self.log_joint(x) + self.log_step, dim=(1, 2))

    @cached_property
    def posterior_table(self) -> Moments:
        """Mean and variance of p(z|x) (mixed over c) and log p(c|x) + const, by quadrature,
        for every binary image in ``binary_images`` order (computed once, 256 at a time)."""
        parts = []
        for images in binary_images(self.slopes.shape[0]).split(256):
            weighted = self.log_joint(images) + self.log_step
            posterior = torch.softmax(weighted.flatten(1), dim=1).view_as(weighted).sum(dim=1)
            mean = posterior @ self.grid
            var = posterior @ self.grid.pow(2) - mean.pow(2)
            parts.append((mean, var, torch.logsumexp(weighted, dim=2)))
        mean, var, logits = (torch.cat(column) for column in zip(*parts, strict=True))
        return mean, var, logits

    def exact_posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Moments:
        mean, var, logits = self.posterior_table
        index = x.long() @ 2 ** torch.arange(x.shape[1])  # the image read as a binary number
        return mean[index, None], var[index, None], logits[index] if self.categories > 1 else None

    def elbo(self, x: torch.Tensor, y: torch.Tensor | None, q: Moments) -> torch.Tensor:
        """sum_c q(c) int q(z) [log p(x, z, c) - log q(z) - log q(c)] dz by quadrature."""
        mean, var, logits = q
        log_qz = diagonal_gaussian_log_density(self.grid, mean, var)  # (N, G)
        log_qc = (
            F.log_softmax(logits, dim=1) if logits is not None else torch.zeros(x.shape[0], 1)
        ).to(F64)
        integrand = self.log_joint(x) - log_qz[:, None, :] - log_qc[:, :, None]
        density = (log_qz[:, None, :] + log_qc[:, :, None] + self.log_step).exp()
        return (density * integrand).sum(dim=(1, 2))

    def sample(self, labels: torch.Tensor | None, seed: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, 1, generator=g, dtype=F64)
        c = torch.randint(self.categories, (n,), generator=g)
        probs = torch.sigmoid(self.decode(z, F.one_hot(c, self.categories)))
        return torch.bernoulli(probs, generator=g).float()


# --- the toy model the estimator sees -------------------------------------------------------


class ToyVAE(nn.Module):
    """``posterior`` and ``decode_sample`` over a ground-truth model, computed in float64 and
    handed to the estimator in ``dtype``; the encoder q is the exact posterior moved by
    ``shift`` posterior sds, its variance times ``widen``, its category logits times
    ``temper`` (1, 1, 1: q is the exact posterior)."""

    def __init__(self, truth, shift=0.0, widen=1.0, temper=1.0, dtype=torch.float32):
        super().__init__()
        self.truth, self.dtype = truth, dtype
        self.shift, self.widen, self.temper = shift, widen, temper

    def encoder(self, x: torch.Tensor, y: torch.Tensor | None) -> Moments:
        mean, var, logits = self.truth.exact_posterior(x, y)
        logits = logits * self.temper if logits is not None else None
        return mean + self.shift * var.sqrt(), var * self.widen, logits

    def posterior(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Posterior:
        mean, var, logits = self.encoder(x, y)
        return Posterior(
            mean.to(self.dtype),
            var.log().to(self.dtype),
            logits.to(self.dtype) if logits is not None else None,
        )

    def decode_sample(self, z, c=None, y=None) -> torch.Tensor:
        assert (c is None) == (self.truth.categories == 1), "c exactly when there is one"
        return self.truth.decode(z.to(F64), c, y).to(self.dtype)


def observation(truth) -> dict:
    """The estimator's ``log_likelihood`` argument for a ground truth: none (the default,
    Bernoulli logits) for a Bernoulli decoder."""
    return {"log_likelihood": truth.log_likelihood} if truth.log_likelihood else {}


@dataclass
class Case:
    """A toy model, a few images drawn from it, and their exact log p(x) and ELBO."""

    model: ToyVAE
    images: torch.Tensor
    labels: torch.Tensor | None
    exact: torch.Tensor  # log p(x) (log p(x|y) with labels) per image, float64
    elbo: torch.Tensor  # of the model's encoder per image, float64

    @classmethod
    def make(cls, truth, labels: torch.Tensor | None, n: int = 4, **encoder) -> Case:
        model = ToyVAE(truth, **encoder)
        images = truth.sample(labels, seed=7, n=n)
        elbo = truth.elbo(images, labels, model.encoder(images, labels))
        return cls(model, images, labels, truth.log_px(images, labels), elbo)

    def estimate(self, samples: int, seed: int, repeats: int = 1, rows_per_pass: int = 10000):
        """L_K for ``repeats`` copies of every image: shape (repeats, N)."""
        labels = self.labels.repeat(repeats) if self.labels is not None else None
        generator = torch.Generator().manual_seed(seed)
        estimates = iwae_log_likelihood(
            self.model,
            self.images.repeat(repeats, 1),
            labels,
            samples,
            generator,
            rows_per_pass,
            **observation(self.model.truth),
        )
        assert estimates.dtype == F64
        return estimates.view(repeats, -1)


PERTURBED = {"shift": SHIFT, "widen": WIDEN, "temper": TEMPER}


def make_case(name: str) -> Case:
    if name == "linear_gaussian":
        return Case.make(LinearGaussian.make(seed=1), torch.tensor([0, 1, 2, 1]), **PERTURBED)
    if name == "bernoulli":
        return Case.make(BernoulliLine.make(seed=2), None, **PERTURBED)
    return Case.make(BernoulliLine.make(seed=3, categories=3), None, **PERTURBED)


@pytest.fixture(scope="module", params=["linear_gaussian", "bernoulli", "categorical"])
def case(request) -> Case:
    return make_case(request.param)


SWEEP_SAMPLES = (1, 4, 16, 64)
# decoder rows per K: var L_K ~ V / K for K >> V = var(p(z|x) / q(z|x)), so the mean of L_K
# then has about the same standard error at every K
SWEEP_ROWS = 2**18


@pytest.fixture(scope="module")
def sweep(case: Case) -> dict[int, torch.Tensor]:
    """Independent estimates L_K, (repeats, N) per K, repeats = SWEEP_ROWS / (K N)."""
    n = case.images.shape[0]
    return {
        k: case.estimate(k, seed=100 + k, repeats=SWEEP_ROWS // (k * n), rows_per_pass=2**17)
        for k in SWEEP_SAMPLES
    }


def standard_error(estimates: torch.Tensor) -> torch.Tensor:
    """Of the mean over repeats (dim 0), per image."""
    return estimates.std(dim=0) / math.sqrt(estimates.shape[0])


# --- the ground truth itself ----------------------------------------------------------------


def test_quadrature_ground_truth_sums_to_one_over_all_images():
    """p(x) by quadrature sums to 1 over all 2^10 binary images, with and without c."""
    images = binary_images(10)
    # the integrand is smooth and negligible at the ends, where the trapezoid rule converges
    # geometrically: 1e-9 is rounding, not quadrature error
    for truth in (BernoulliLine.make(seed=2), BernoulliLine.make(seed=3, categories=3)):
        assert torch.logsumexp(truth.log_px(images), dim=0).item() == pytest.approx(0, abs=1e-9)


def test_closed_form_elbo_of_exact_posterior_is_log_px():
    """KL(q || p(z|x)) = 0 at the exact posterior: ties the closed-form ELBO, posterior and
    MultivariateNormal marginal together."""
    truth = LinearGaussian.make(seed=1)
    labels = torch.tensor([0, 1, 2, 1])
    images = truth.sample(labels, seed=7, n=4)
    elbo = truth.elbo(images, labels, truth.exact_posterior(images, labels))
    torch.testing.assert_close(elbo, truth.log_px(images, labels), rtol=0, atol=1e-10)


# --- exact posterior: every weight is log p(x) -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("categories", [0, 3])
def test_exact_posterior_gives_log_px_for_every_k_and_chunking(dtype, labelled, categories):
    """With q(z, c|x) = p(z, c|x), p(x, z, c) / q(z, c|x) = p(x) for every draw: each
    log-weight, and L_K for every K and ``rows_per_pass`` (one image per pass with the draws
    in chunks and a remainder, or several images per pass), is log p(x) up to rounding."""
    truth = LinearGaussian.make(seed=4, categories=categories)
    labels = torch.tensor([2, 0, 1, 1, 0, 2]) if labelled else None
    images = truth.sample(labels, seed=5, n=6)
    exact = truth.log_px(images, labels)
    model = ToyVAE(truth, dtype=dtype)
    # float32 log-weights add terms of a few nats: their rounding, measured up to 3e-6
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5

    weights = log_weights(
        model, images, labels, 64, torch.Generator().manual_seed(0), truth.log_likelihood
    )
    assert weights.shape == (64, 6)  # (samples, batch): column i belongs to image i
    torch.testing.assert_close(weights.double(), exact.expand(64, 6), rtol=0, atol=tolerance)

    for samples, rows_per_pass in itertools.product([1, 7, 50], [1, 7, 120, 10000]):
        estimates = iwae_log_likelihood(
            model,
            images,
            labels,
            samples,
            torch.Generator().manual_seed(samples),
            rows_per_pass=rows_per_pass,
            log_likelihood=truth.log_likelihood,
        )
        assert estimates.shape == (6,) and estimates.dtype == F64
        torch.testing.assert_close(estimates, exact, rtol=0, atol=tolerance)


def test_estimate_nll_summarizes_per_image_log_likelihoods():
    """With the exact posterior L_K = log p(x), so the split's NLL and its standard error
    are those of the exact values (numpy, sample standard deviation)."""
    truth = LinearGaussian.make(seed=4)
    images = truth.sample(None, seed=5, n=6)
    exact = truth.log_px(images).numpy()
    model = ToyVAE(truth, dtype=torch.float64)
    result = estimate_nll(
        model, images, None, 20, torch.Generator().manual_seed(0), rows_per_pass=30,
        log_likelihood=truth.log_likelihood,
    )
    assert (result.samples, result.images) == (20, 6)
    assert result.nll == pytest.approx(-exact.mean(), abs=1e-9)
    assert result.standard_error == pytest.approx(exact.std(ddof=1) / math.sqrt(6), abs=1e-9)

    single = estimate_nll(
        model, images[:1], None, 20, torch.Generator().manual_seed(0), rows_per_pass=30,
        log_likelihood=truth.log_likelihood,
    )
    assert single.nll == pytest.approx(-exact[0], abs=1e-9)
    assert math.isnan(single.standard_error)


def test_rejects_fewer_than_one_sample():
    truth = LinearGaussian.make(seed=4)
    with pytest.raises(ValueError):
        iwae_log_likelihood(
            ToyVAE(truth), truth.sample(None, seed=5, n=2), None, 0, torch.Generator()
        )


# --- an approximate posterior: the bound and its gap -----------------------------------------


@pytest.mark.parametrize("rows_per_pass", [37, 4096, 10000])
def test_k5000_is_within_a_tenth_of_a_nat_of_exact(case: Case, rows_per_pass: int):
    """K = 5000 from q != p(z|x): within 0.1 nats of log p(x) for every image, whether the
    5000 draws come in 135 chunks of 37 and a remainder of 5, in 4096 + 904, or with two
    images a pass. With V = var(p(z|x) / q(z|x)) = 0.6-1.6 here (by quadrature), the gap
    log p(x) - E[L_K] ~ V / 2K is ~1e-4 nats and the sd of L_5000, sqrt(V / K), < 0.02:
    0.1 is over 5 sd, and still
    breaks for a wrong weight or normalization (a missing log(1/3) costs 1.1 nats)."""
    estimates = case.estimate(5000, seed=rows_per_pass, rows_per_pass=rows_per_pass)[0]
    assert (estimates - case.exact).abs().max().item() < 0.1


def test_mean_rises_with_k(sweep: dict[int, torch.Tensor], case: Case):
    """E[L_K] is non-decreasing in K and below log p(x): the mean over repeats and images
    rises strictly from K = 1 to 4, 16 and 64 (the smallest rise, 16 to 64, is ~V / 43 and
    6-11 SE of the difference at these sizes), towards the exact value: at K = 64 the gap
    is ~V / 128 (measured 0.002-0.016), under 0.05."""
    means = torch.stack([sweep[k].mean() for k in SWEEP_SAMPLES])
    assert (means.diff() > 0).all(), means
    assert case.exact.mean() - means[-1] < 0.05


def test_never_exceeds_exact_by_more_than_monte_carlo_error(sweep, case: Case):
    """L_K is a stochastic lower bound: for every image and K the mean over repeats is at
    most log p(x) + 3 SE, and no single estimate exceeds log p(x) by more than 5 sd of L_K,
    its Monte Carlo error estimated from the repeats (L_K's upper tail is light: the largest
    of 1024-65536 repeats measured is 3.4 sd above log p(x))."""
    for k, estimates in sweep.items():
        excess = estimates - case.exact
        assert (excess.mean(dim=0) <= 3 * standard_error(estimates)).all(), k
        assert (excess.max(dim=0).values <= 5 * estimates.std(dim=0)).all(), k


def test_k1_mean_is_the_elbo(sweep, case: Case):
    """E[L_1] = ELBO = E_q[log p(x, z, c) - log q(z, c|x)] (closed form, or quadrature): the
    mean of 65536 independent L_1 per image is within 4 SE of it, and the ELBO is below
    log p(x) by KL(q || p(z|x)), which the perturbed encoder makes clearly positive."""
    estimates = sweep[1]
    error = (estimates.mean(dim=0) - case.elbo).abs()
    assert (error <= 4 * standard_error(estimates)).all(), (error, standard_error(estimates))
    assert (case.exact - case.elbo > 0.05).all()


# ---------------------------------------------------------------------------------------------
# which test images eval.iwae_images scores


def test_the_likelihood_subset_is_a_fair_sample_of_mnists_ordered_test_split(mnist_root):
    """MNIST's test file is ordered: its first 5,000 images come from the cleaner writers and
    carry less ink. The subset ``eval.iwae_images: 1000`` scores is a seeded random one: its
    mean ink is the split's, where the first 1,000 images' is about 10 below it."""
    from vaebench.data import load_arrays
    from vaebench.scoring.evaluation import likelihood_subset

    images = torch.from_numpy(load_arrays("mnist", mnist_root)["test"][0]).double() / 255
    ink = images.flatten(1).sum(1)
    chosen = likelihood_subset(len(images), 1000)
    assert chosen is not None and len(chosen) == len(set(chosen.tolist())) == 1000
    assert torch.equal(chosen, likelihood_subset(len(images), 1000))  # the same every time
    assert abs(ink[chosen].mean() - ink.mean()) < 2.5  # a standard error is about 1
    assert ink.mean() - ink[:1000].mean() > 7  # what scoring the first 1,000 did
    assert likelihood_subset(len(images), None) is None
    assert likelihood_subset(len(images), 20000) is None  # more than there are: all


def test_likelihood_metrics_score_the_subset(mnist_root):
    """The estimate a run logs over ``eval.iwae_images`` is the estimator's over the subset."""
    from vaebench.data import load_splits
    from vaebench.models import build_model
    from vaebench.scoring.evaluation import eval_generator, likelihood_metrics, likelihood_subset
    from vaebench.spec.config import RunConfig

    config = RunConfig.model_validate({
        "data": {"subset": 256, "binarize": "dynamic"},
        "model": {"hidden": [16], "z_dim": 2},
        "eval": {"iwae_samples": 4, "iwae_images": 50},
    })
    test = load_splits(config.data, mnist_root, torch.device("cpu")).test
    torch.manual_seed(0)
    model = build_model(config.model, (1, 28, 28)).eval()
    chosen = likelihood_subset(len(test), 50)
    direct = estimate_nll(
        model, test.images[chosen], test.labels[chosen], 4, eval_generator("test", "cpu")
    )
    logged = likelihood_metrics(model, test, "test", config)
    assert logged["test_nll"] == pytest.approx(direct.nll, rel=1e-12)
    generator = eval_generator("test", "cpu")
    first = estimate_nll(model, test.images[:50], test.labels[:50], 4, generator)
    assert logged["test_nll"] != pytest.approx(first.nll, rel=1e-6)
