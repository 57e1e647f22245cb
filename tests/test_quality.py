import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from runtime.errors import ConfigError
from runtime.quality import auc, entropy_deciles, log_loss
from runtime.router import (
    LLMCalibration,
    binary_entropy,
    calibrate_threshold,
    route_by_budget,
    route_by_threshold,
)


def test_auc_and_logloss_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) * 0.5 + labels * 0.2, 2)  # many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    probs = np.clip(scores, 0.01, 0.99)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), abs=1e-9)
    assert np.isnan(auc(np.ones(4), np.arange(4)))


def test_entropy_is_symmetric_and_maximal_at_half():
    p = np.array([0.5, 0.1, 0.9, 1.0])
    h = binary_entropy(p)
    assert h[0] == pytest.approx(np.log(2))
    assert h[1] == pytest.approx(h[2])
    assert h[3] < 1e-5


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5])
def test_threshold_routes_the_requested_fraction(fraction):
    rng = np.random.default_rng(1)
    valid = binary_entropy(rng.random(100_000))
    test = binary_entropy(rng.random(100_000))
    threshold = calibrate_threshold(valid, fraction)
    assert route_by_threshold(test, threshold).mean() == pytest.approx(fraction, abs=0.01)
    assert route_by_budget(test, fraction).sum() == round(fraction * len(test))


def test_router_edges_and_bad_fraction():
    h = np.array([0.1, 0.2])
    assert not route_by_threshold(h, calibrate_threshold(h, 0.0)).any()
    assert route_by_threshold(h, calibrate_threshold(h, 1.0)).all()
    with pytest.raises(ConfigError, match="fraction"):
        calibrate_threshold(h, 1.5)


def test_entropy_deciles_cover_all_samples():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    rows = entropy_deciles(labels, p, {"llm": p})
    assert sum(r["count"] for r in rows) == 1000
    assert all(rows[i]["entropy_max"] <= rows[i + 1]["entropy_min"] for i in range(9))
    assert "llm_auc" in rows[0]


def test_llm_calibration_recovers_a_logistic_map():
    rng = np.random.default_rng(3)
    p = 1 / (1 + np.exp(-rng.normal(0.4, 0.1, 20_000)))  # a narrow, "always yes" LLM
    z = np.log(p / (1 - p))
    labels = (rng.random(len(p)) < 1 / (1 + np.exp(-(8.0 * z - 3.3)))).astype(float)
    calibration = LLMCalibration.fit(p, labels)
    assert calibration.slope == pytest.approx(8.0, rel=0.1)
    assert calibration.intercept == pytest.approx(-3.3, abs=0.4)
    assert log_loss(labels, calibration.apply(p)) < log_loss(labels, p) - 0.01
    assert auc(labels, calibration.apply(p)) == pytest.approx(auc(labels, p))  # monotone: same ranking
    assert LLMCalibration.from_dict(calibration.to_dict()) == calibration


def test_llm_calibration_never_reverses_the_ranking_and_needs_data():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 500).astype(float)
    reversed_p = np.where(labels == 1, 0.4, 0.6) + rng.normal(0, 0.01, 500)
    flat = LLMCalibration.fit(reversed_p, labels)
    assert flat.slope == 0.0
    assert flat.apply(reversed_p) == pytest.approx(np.full(500, labels.mean()))
    assert LLMCalibration.fit(np.full(10, 0.7), labels[:10]).slope == 0.0
    assert LLMCalibration().apply(np.array([0.3])) == pytest.approx([0.3])
    with pytest.raises(ConfigError, match="at least 2"):
        LLMCalibration.fit(np.array([0.5]), np.array([1.0]))
    with pytest.raises(ConfigError, match="malformed"):
        LLMCalibration.from_dict({"slope": "steep"})


def test_expected_gain_tells_an_llm_that_knows_from_one_that_guesses():
    from runtime.quality import describe_gain, expected_gain

    rng = np.random.default_rng(3)
    n = 4000
    labels = rng.integers(0, 2, n)
    truth = np.where(labels == 1, 1.0, -1.0)
    crm = 1 / (1 + np.exp(-(truth * 1.2 + rng.normal(0, 1.5, n))))
    routed = binary_entropy(crm) > np.quantile(binary_entropy(crm), 0.8)  # the CRM's least sure 20%
    scored = np.flatnonzero(routed)[::2]  # half of them scored, as export samples them
    knowing = 1 / (1 + np.exp(-(truth[scored] * 2.0 + rng.normal(0, 1, len(scored)))))
    guessing = rng.random(len(scored))
    good = expected_gain(labels, crm, routed, scored, knowing)
    assert good["low"] > 0 and good["routed_llm_auc"] > 0.8 > 0.6 > good["routed_crm_auc"]
    assert good["rows"] == int((~routed).sum()) + len(scored) and good["logloss_hybrid"] < good["logloss_crm"]
    assert "nothing measurable" not in describe_gain(good)
    bad = expected_gain(labels, crm, routed, scored, guessing)
    assert bad["low"] <= 0 <= bad["high"] or bad["high"] < 0
    assert "nothing measurable" in describe_gain(bad)
