# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: © 2026 d3p developers
"""Smoke runs of the example scripts, with checks of the numbers they return.

Each example runs once, in its ``--smoke`` mode, at a large epsilon (little noise), and
its ``main(argv) -> dict`` result is checked against the truth: these tests fail if DP-VI
ends up far from it. The examples need the ``examples`` extra (scikit-learn for the
bundled data sets, matplotlib for ``--plot``), which the ``test`` extra includes;
without them the tests are skipped.
Every ``DPSVI.run`` compiles its training loop, so each test makes as few runs as it can.
Together they take about two minutes on two cores, so they are marked ``slow`` (the
default run leaves them out; ``.ci/run`` runs them in its second pytest call, and also
runs every example script in smoke mode).
"""

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sklearn", reason="the examples need the 'examples' extra")
pytest.importorskip("matplotlib", reason="the examples need the 'examples' extra")

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"d3p_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def assert_budget_respected(result: dict) -> None:
    # The examples calibrate sigma with force_smaller=True: the privacy spent (computed
    # again by DPSVI.run with the same accountant) never exceeds the target.
    assert 0 < result["epsilon_spent"] <= result["epsilon_target"]
    assert result["sigma"] > 0


def test_every_example_is_tested():
    tested = {
        "logistic_regression",
        "simple_gaussian_posterior",
        "gaussian_mixture_model",
        "vae",
        "bnn",
        "audit",  # tests/test_audit.py::test_example_smoke
        "federated",  # tests/test_federated.py
    }
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_logistic_regression(tmp_path):
    plot = tmp_path / "lr.png"
    result = load_example("logistic_regression").main(
        ["--smoke", "--epsilon", "10", "--plot", str(plot)]
    )
    assert_budget_respected(result)
    assert_png(plot)
    assert [row["epsilon_target"] for row in result["sweep"]] == [10.0]
    # 114 test records, 63 % in the majority class. Logistic regression reaches about 95 %
    # on this data set; the binomial standard deviation of a 95 % accuracy on 114 records
    # is 0.020, so 0.85 is 5 standard deviations below it (and far above 0.63).
    for scores in (result["dp"], result["nonprivate"]):
        assert scores["accuracy"] >= 0.85
        # log 0.74 = -0.30: on average at least 74 % predictive probability on the true
        # label; always predicting the majority rate would score about -0.66.
        assert scores["log_likelihood"] >= -0.30


def test_logistic_regression_synthetic_recovers_weights():
    # Synthetic data: 8000 training records, 10 features + intercept with known weights.
    # The non-private MLE has a standard error of about 0.03 per weight (Fisher information
    # ~ N * p(1-p) with p(1-p) <= 1/4 gives sd >= 2 / sqrt(8000) = 0.022), so a distance
    # of 0.5 over 11 weights (about 0.15 per weight, 5 such sds) means "recovered".
    result = load_example("logistic_regression").main(
        ["--smoke", "--epsilon", "10", "--dataset", "synthetic"]
    )
    assert_budget_respected(result)
    assert result["dp"]["weight_error"] < 0.5
    assert result["nonprivate"]["weight_error"] < 0.5


def test_logistic_regression_aligned_noise_aware():
    # the options of issue 27: aligned gradients, averaging and the noise-aware posterior
    # (same budget); at epsilon = 10 the weights are recovered as without them (see above)
    result = load_example("logistic_regression").main(
        ["--smoke", "--epsilon", "10", "--dataset", "synthetic", "--aligned", "--noise-aware"]
    )
    assert_budget_respected(result)
    assert result["aligned"] and result["noise_aware"]
    assert result["dp"]["weight_error"] < 0.5
    # 11 weights: a 90 % interval that covers each with probability >= 0.8 covers at most 5
    # of them with probability < 0.002
    assert result["dp"]["coverage90"] >= 6 / 11


def test_simple_gaussian_posterior(tmp_path):
    module = load_example("simple_gaussian_posterior")
    plot = tmp_path / "gauss.png"
    result = module.main(["--smoke", "--epsilon", "100", "--plot", str(plot)])
    assert_budget_respected(result)
    assert_png(plot)
    # The closed form itself: N = 10^4 records with unit noise, prior sd 10.
    assert result["exact_std"] == pytest.approx([1 / math.sqrt(1e-2 + 1e4)] * 2)
    # At epsilon = 100 (sigma ~ 0.5) the DP-VI posterior must sit on the exact one: means
    # within 5 exact posterior sds (0.05, a 20th of the data's sd and a 200th of the
    # prior's), standard deviations within a factor of 2 (the short smoke run leaves some
    # optimisation noise; a wrong normaliser or plate scale misses by a factor of ~N).
    for dp_mean, exact_mean, exact_std in zip(
        result["dp_mean"], result["exact_mean"], result["exact_std"], strict=True
    ):
        assert abs(dp_mean - exact_mean) < 5 * exact_std
    for dp_std, exact_std in zip(result["dp_std"], result["exact_std"], strict=True):
        assert 0.5 * exact_std < dp_std < 2 * exact_std


def test_gaussian_mixture_model(tmp_path):
    module = load_example("gaussian_mixture_model")
    plot = tmp_path / "gmm.png"
    result = module.main(["--smoke", "--epsilon", "10", "--plot", str(plot)])
    assert_budget_respected(result)
    assert_png(plot)
    # N = 10^4 records; the smallest component has ~2000 records and scales <= 1.2, so each
    # coordinate of its mean has a sampling sd of about 1.2 / sqrt(2000) = 0.027 and the
    # weights have sd sqrt(0.2 * 0.8 / 10^4) = 0.004. We allow 0.25 (about 10 sds) for the
    # locations and 0.03 for the weights, leaving room for clipping bias and optimiser noise.
    assert result["max_loc_error"] < 0.25
    assert result["weights"] == pytest.approx(module.TRUE_WEIGHTS.tolist(), abs=0.03)
    # Clipping shrinks the fitted scales somewhat (outlying points lose influence): 25 %.
    for fitted, true in zip(result["scales"], module.TRUE_SCALES.tolist(), strict=True):
        assert fitted == pytest.approx(true, rel=0.25)


def test_vae(tmp_path):
    plot = tmp_path / "vae.png"
    result = load_example("vae").main(["--smoke", "--epsilon", "100", "--plot", str(plot)])
    assert_budget_respected(result)
    assert_png(plot)
    # The ELBO is a lower bound on the log-likelihood; beating the exact log-likelihood of
    # independent pixels (fitted without privacy) means the DP VAE learned correlations
    # between pixels. A random or untrained decoder scores about 64 log(1/2) = -44 nats.
    # (The DP smoke run scored -24.2 to -24.5 against -25.25 over seeds 0-2.)
    assert result["test_elbo_dp"] > result["test_loglik_independent_pixels"]
    assert result["test_elbo_nonprivate"] > result["test_loglik_independent_pixels"]


def test_bnn(tmp_path):
    plot = tmp_path / "bnn.png"
    result = load_example("bnn").main(["--smoke", "--epsilon", "10", "--plot", str(plot)])
    assert_budget_respected(result)
    assert_png(plot)
    # 89 test patients. Predicting the training mean scores an RMSE of about 70 (the
    # target's spread); least squares on the 10 features about 54. Both fits must predict
    # better than the mean does; a network that learned nothing, or a wrong scaling of the
    # data term, would not.
    for name in ("dp", "nonprivate"):
        assert result[name]["rmse"] < result["constant_rmse"], name
    # the predictive intervals are not degenerate: some but not all targets fall outside
    assert 0.3 < result["dp"]["coverage_90"] < 1.0
