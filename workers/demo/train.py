"""Train the demo fraud model on synthetic payments and export it to ONNX with its feature spec.

`python -m workers.demo.train` rewrites `fraud_score.onnx` and `fraud_score.spec.json` beside this
file; the data, the model and the export are deterministic, so a rerun gives the same bytes (with
the same scikit-learn, skl2onnx and onnx versions). Needs the `train` extra (scikit-learn,
skl2onnx, onnx); the server itself never imports this module.

The model is a HistGradientBoostingClassifier (150 trees of at most 15 leaves) constrained to be
monotone in the risk signals, so occlusion explanations never credit a risk signal with lowering
the score. The data is a fixed-seed mixture of legitimate customers and three kinds of fraudster
(new-account bust-out, account takeover, card testing) whose signals overlap with legitimate
behaviour, plus a little label noise, so the model is useful but not perfect (held-out AUC about
0.95). Amounts are in one reference unit whatever the currency (no exchange rates).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conf.datadir import write_atomically

DEMO_DIR = Path(__file__).resolve().parent
MODEL_FILE = "fraud_score.onnx"
SPEC_FILE = "fraud_score.spec.json"
SEED = 20240115
DEFAULT_ROWS = 200_000
TREES = 150
OTHER = "__other__"

# Country -> (home currency, sampling weight). BR, IN and CN pay cross-border in USD.
COUNTRIES = {
    "US": ("USD", 0.20), "GB": ("GBP", 0.08), "FR": ("EUR", 0.07), "DE": ("EUR", 0.06),
    "SN": ("XOF", 0.07), "CI": ("XOF", 0.06), "NG": ("NGN", 0.10), "KE": ("KES", 0.08),
    "GH": ("GHS", 0.05), "ZA": ("ZAR", 0.06), "MA": ("MAD", 0.04), "CA": ("CAD", 0.04),
    "BR": ("USD", 0.03), "IN": ("USD", 0.03), "CN": ("USD", 0.02),
}
CURRENCIES = ["USD", "EUR", "GBP", "XOF", "NGN", "KES", "GHS", "ZAR", "MAD", "CAD"]
PAYMENT_METHODS = ["card", "wallet", "bank_transfer", "mobile_money", "crypto"]
LEGIT_METHOD_WEIGHTS = [0.55, 0.14, 0.12, 0.16, 0.02, 0.01]  # last: an unknown method
MOBILE_MONEY_COUNTRIES = {"SN", "CI", "NG", "KE", "GH"}

# Column order of the model input: (name, source, kind, required, min, max, integer, normalize).
FEATURE_TABLE = [
    ("amount", "amount", "numeric", True, 0, 10_000_000, False, None),
    ("currency", "currency", "categorical", True, None, None, False, "upper"),
    ("country", "country", "categorical", True, None, None, False, "upper"),
    ("payment_method", "payment_method", "categorical", True, None, None, False, "lower"),
    ("hour_of_day", "features.hour_of_day", "numeric", False, 0, 23, True, None),
    ("is_weekend", "features.is_weekend", "numeric", False, 0, 1, True, None),
    ("account_age_days", "features.account_age_days", "numeric", False, 0, 36_500, True, None),
    ("txn_count_24h", "features.txn_count_24h", "numeric", False, 0, 100_000, True, None),
    ("amount_avg_30d", "features.amount_avg_30d", "numeric", False, 0, 10_000_000, False, None),
    ("distinct_cards_7d", "features.distinct_cards_7d", "numeric", False, 0, 10_000, True, None),
    ("ip_country_mismatch", "features.ip_country_mismatch", "numeric", False, 0, 1, True, None),
    ("failed_logins_24h", "features.failed_logins_24h", "numeric", False, 0, 100_000, True, None),
    ("is_new_device", "features.is_new_device", "numeric", False, 0, 1, True, None),
]
NAMES = [row[0] for row in FEATURE_TABLE]
COL = {name: i for i, name in enumerate(NAMES)}
# +1: more of it can only raise the score; -1: can only lower it; the rest are free.
MONOTONE = {"account_age_days": -1, "txn_count_24h": 1, "distinct_cards_7d": 1,
            "ip_country_mismatch": 1, "failed_logins_24h": 1, "is_new_device": 1}
VOCABULARIES = {
    "currency": CURRENCIES + [OTHER],
    "country": list(COUNTRIES) + [OTHER],
    "payment_method": PAYMENT_METHODS + [OTHER],
}
# Hour-of-day weights of legitimate traffic: quiet nights, busy afternoons and evenings.
DAY_HOURS = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3.5, 4.5, 5, 5.5,
                      6, 6, 5.5, 5.5, 5.5, 6, 6.5, 6.5, 6, 5, 3.5, 2])
NIGHT_HOURS = np.array([5, 6, 6, 5.5, 4, 2.5, 1, 1, 1, 1, 1, 1,
                        1, 1, 1, 1, 1, 1, 1, 1.5, 2, 2.5, 3.5, 4.5])


@dataclass
class TrainReport:
    """What a training run produced and how well the model does on the held-out rows."""

    model_path: Path
    spec_path: Path
    rows: int
    fraud_rate: float
    auc: float
    threshold: float
    precision: float
    recall: float
    onnx_gap: float  # largest |ONNX - scikit-learn| probability on the held-out rows


def generate_transactions(n_rows: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic payments as model inputs (categoricals already vocabulary indices) and labels."""
    rng = np.random.default_rng(seed)
    X = _legit_rows(rng, n_rows)
    fraudster = rng.random(n_rows) < 0.03
    scenario = rng.choice(4, size=n_rows, p=[0.35, 0.35, 0.2, 0.1])
    for kind, shift in enumerate([_new_account, _takeover, _card_testing, _generic]):
        rows = np.flatnonzero(fraudster & (scenario == kind))
        shift(rng, X, rows)
    X[:, COL["amount"]] = np.clip(np.round(X[:, COL["amount"]], 2), 0.5, 9_000_000)
    # Label noise: chargebacks on honest payments and fraud that never gets reported.
    y = fraudster.copy()
    y[rng.random(n_rows) < 0.002] = True
    y[fraudster & (rng.random(n_rows) < 0.05)] = False
    return X.astype(np.float32), y.astype(np.int64)


def _legit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Legitimate behaviour for every row; fraud scenarios overwrite parts of it later."""
    X = np.zeros((n, len(NAMES)), dtype=np.float64)
    countries = list(COUNTRIES)
    weights = np.array([COUNTRIES[c][1] for c in countries])
    country = rng.choice(len(countries), size=n, p=weights / weights.sum())
    country[rng.random(n) < 0.01] = len(countries)  # a country outside the vocabulary
    X[:, COL["country"]] = country
    home = np.array([CURRENCIES.index(COUNTRIES[c][0]) for c in countries] + [0])
    currency = home[country]
    foreign = rng.random(n) < 0.08
    currency[foreign] = rng.integers(0, len(CURRENCIES) + 1, size=int(foreign.sum()))
    X[:, COL["currency"]] = currency
    X[:, COL["payment_method"]] = _legit_methods(rng, country, countries)
    X[:, COL["hour_of_day"]] = rng.choice(24, size=n, p=DAY_HOURS / DAY_HOURS.sum())
    X[:, COL["is_weekend"]] = rng.random(n) < 2 / 7
    age = np.exp(rng.normal(np.log(420), 1.0, size=n))
    young = rng.random(n) < 0.07
    age[young] = rng.integers(0, 30, size=int(young.sum()))
    X[:, COL["account_age_days"]] = np.clip(np.round(age), 0, 5000)
    X[:, COL["txn_count_24h"]] = rng.poisson(1.3, size=n)
    avg = np.exp(rng.normal(np.log(45), 0.9, size=n))
    X[:, COL["amount_avg_30d"]] = np.round(avg, 2)
    X[:, COL["amount"]] = avg * np.exp(rng.normal(0.0, 0.6, size=n))
    X[:, COL["distinct_cards_7d"]] = 1 + rng.poisson(0.15, size=n)
    X[:, COL["ip_country_mismatch"]] = rng.random(n) < 0.05
    X[:, COL["failed_logins_24h"]] = rng.poisson(0.1, size=n)
    X[:, COL["is_new_device"]] = rng.random(n) < 0.08
    return X


def _legit_methods(rng: np.random.Generator, country: np.ndarray, countries: list) -> np.ndarray:
    """Payment methods of honest customers; mobile money is common where it is common."""
    n = len(country)
    method = rng.choice(len(PAYMENT_METHODS) + 1, size=n, p=LEGIT_METHOD_WEIGHTS)
    mobile_idx = [i for i, c in enumerate(countries) if c in MOBILE_MONEY_COUNTRIES]
    switch = np.isin(country, mobile_idx) & (rng.random(n) < 0.3)
    method[switch] = PAYMENT_METHODS.index("mobile_money")
    return method


def _some(rng: np.random.Generator, rows: np.ndarray, p: float) -> np.ndarray:
    """The subset of `rows` (each kept with probability p) that shows a given fraud signal."""
    return rows[rng.random(len(rows)) < p]


def _night(rng: np.random.Generator, n: int) -> np.ndarray:
    """Hours drawn from the night-heavy distribution of fraud."""
    return rng.choice(24, size=n, p=NIGHT_HOURS / NIGHT_HOURS.sum())


def _set_ratio(rng, X, rows, median_ratio: float, sigma: float) -> None:
    """Sets amount to amount_avg_30d times a log-normal ratio around `median_ratio`."""
    ratio = np.exp(rng.normal(np.log(median_ratio), sigma, size=len(rows)))
    X[rows, COL["amount"]] = X[rows, COL["amount_avg_30d"]] * ratio


def _new_account(rng, X, rows) -> None:
    """Bust-out: a fresh account, many payments fast, crypto or wallet, often at night."""
    r = _some(rng, rows, 0.85)
    X[r, COL["account_age_days"]] = rng.integers(0, 15, size=len(r))
    r = _some(rng, rows, 0.7)
    X[r, COL["txn_count_24h"]] = 2 + rng.poisson(6, size=len(r))
    r = _some(rng, rows, 0.5)
    X[r, COL["payment_method"]] = rng.choice([PAYMENT_METHODS.index("crypto"),
                                              PAYMENT_METHODS.index("wallet")], size=len(r))
    r = _some(rng, rows, 0.5)
    X[r, COL["hour_of_day"]] = _night(rng, len(r))
    _set_ratio(rng, X, _some(rng, rows, 0.5), 5.0, 0.8)
    X[_some(rng, rows, 0.6), COL["is_new_device"]] = 1


def _takeover(rng, X, rows) -> None:
    """Account takeover: an old account, a new device, failed logins, foreign IP, big payment."""
    X[_some(rng, rows, 0.8), COL["is_new_device"]] = 1
    r = _some(rng, rows, 0.6)
    X[r, COL["failed_logins_24h"]] = 1 + rng.poisson(3, size=len(r))
    X[_some(rng, rows, 0.7), COL["ip_country_mismatch"]] = 1
    _set_ratio(rng, X, _some(rng, rows, 0.7), 10.0, 0.8)
    r = _some(rng, rows, 0.5)
    X[r, COL["hour_of_day"]] = _night(rng, len(r))
    r = _some(rng, rows, 0.4)
    X[r, COL["payment_method"]] = rng.choice([PAYMENT_METHODS.index(m) for m in
                                              ("crypto", "wallet", "bank_transfer")], size=len(r))


def _card_testing(rng, X, rows) -> None:
    """Card testing: many cards, high velocity, tiny amounts, mostly cards."""
    r = _some(rng, rows, 0.85)
    X[r, COL["distinct_cards_7d"]] = 3 + rng.poisson(4, size=len(r))
    r = _some(rng, rows, 0.8)
    X[r, COL["txn_count_24h"]] = 3 + rng.poisson(10, size=len(r))
    r = _some(rng, rows, 0.7)
    X[r, COL["amount"]] = np.exp(rng.normal(np.log(3), 0.8, size=len(r)))
    X[_some(rng, rows, 0.9), COL["payment_method"]] = PAYMENT_METHODS.index("card")
    X[_some(rng, rows, 0.4), COL["ip_country_mismatch"]] = 1


def _generic(rng, X, rows) -> None:
    """Opportunistic fraud: weak versions of every signal."""
    r = _some(rng, rows, 0.3)
    X[r, COL["account_age_days"]] = rng.integers(0, 60, size=len(r))
    r = _some(rng, rows, 0.3)
    X[r, COL["txn_count_24h"]] += 1 + rng.poisson(2, size=len(r))
    _set_ratio(rng, X, _some(rng, rows, 0.3), 3.0, 0.7)
    X[_some(rng, rows, 0.3), COL["ip_country_mismatch"]] = 1
    X[_some(rng, rows, 0.3), COL["is_new_device"]] = 1
    r = _some(rng, rows, 0.3)
    X[r, COL["hour_of_day"]] = _night(rng, len(r))


def fit_model(X: np.ndarray, y: np.ndarray, seed: int = SEED):
    """Histogram gradient-boosted trees, monotone in the risk signals, on one thread.

    Monotone constraints keep explanations honest: moving a risk signal back to its baseline
    can only lower the score. One thread, because the OpenMP reductions of the fit sum in an
    order that depends on the thread count, and the output must not depend on the machine.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    model = HistGradientBoostingClassifier(
        max_iter=TREES, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=40,
        l2_regularization=1.0, monotonic_cst=[MONOTONE.get(name, 0) for name in NAMES],
        early_stopping=False, random_state=seed,
    )
    with threadpool_limits(limits=1):
        return model.fit(X, y)


def export_onnx(model) -> bytes:
    """The model as ONNX: one float32 input `features` [None, F], probabilities as a tensor."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    with _leaf_missing_flag_as_int():
        onx = convert_sklearn(
            model,
            name="sira-fraud-demo",
            initial_types=[("features", FloatTensorType([None, len(NAMES)]))],
            options={id(model): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    onx.doc_string = "SIRA demo fraud model (synthetic data); see workers/demo/train.py"
    return onx.SerializeToString()


@contextlib.contextmanager
def _leaf_missing_flag_as_int():
    """Works around skl2onnx 1.20 passing a Python bool for the missing-value flag of
    HistGradientBoosting leaves, which onnx 1.23 rejects in an ints attribute."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*args, nodes_missing_value_tracks_true=0, **kwargs):
        flag = int(nodes_missing_value_tracks_true)
        return original(*args, nodes_missing_value_tracks_true=flag, **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def onnx_scores(model_bytes: bytes, X: np.ndarray) -> np.ndarray:
    """Positive-class probabilities from the exported model, as the server computes them."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"features": X})[0][:, 1]


def choose_threshold(y: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    """The held-out score that maximises F1, with its precision and recall."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    threshold = round(float(thresholds[best]), 4)
    flagged = scores >= threshold
    tp = int(np.sum(flagged & (y == 1)))
    return threshold, tp / max(int(flagged.sum()), 1), tp / max(int(y.sum()), 1)


def build_spec(X_legit: np.ndarray, threshold: float) -> dict:
    """The feature spec; baselines and defaults are a typical legitimate payment of the data."""
    features = []
    for col, (name, source, kind, required, lo, hi, integer, normalize) in enumerate(FEATURE_TABLE):
        entry: dict = {"name": name, "source": source, "type": kind, "required": required}
        if kind == "numeric":
            typical = float(np.median(X_legit[:, col]))
            typical = round(typical) if integer else round(typical, 2)
            entry.update({"min": lo, "max": hi})
            if integer:
                entry["integer"] = True
        else:
            vocabulary = VOCABULARIES[name]
            counts = np.bincount(X_legit[:, col].astype(np.int64), minlength=len(vocabulary))
            typical = vocabulary[int(np.argmax(counts))]
            entry.update({"normalize": normalize, "vocabulary": vocabulary,
                          "default_bucket": OTHER})
        if not required:
            entry["default"] = typical
        entry["baseline"] = typical
        features.append(entry)
    return {
        "spec_version": 1,
        "name": "sira-fraud-demo",
        "product": "fraud_score",
        "input_name": "features",
        "output_name": "probabilities",
        "positive_class_index": 1,
        "threshold": threshold,
        "features": features,
    }


def train(out_dir: str | os.PathLike = DEMO_DIR, n_rows: int = DEFAULT_ROWS,
          seed: int = SEED) -> TrainReport:
    """Generates the data, trains, picks the threshold on held-out rows and writes both files."""
    from sklearn.metrics import roc_auc_score

    X, y = generate_transactions(n_rows, seed)
    split = int(n_rows * 0.8)
    model = fit_model(X[:split], y[:split], seed)
    model_bytes = export_onnx(model)
    scores = onnx_scores(model_bytes, X[split:])
    onnx_gap = float(np.max(np.abs(scores - model.predict_proba(X[split:])[:, 1])))
    if onnx_gap > 1e-4:
        raise RuntimeError(f"the ONNX export disagrees with scikit-learn by {onnx_gap:.2e}")
    auc = float(roc_auc_score(y[split:], scores))
    threshold, precision, recall = choose_threshold(y[split:], scores)
    spec = build_spec(X[:split][y[:split] == 0], threshold)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path, spec_path = out / MODEL_FILE, out / SPEC_FILE
    write_atomically(str(model_path), model_bytes, 0o644)
    write_atomically(str(spec_path), json.dumps(spec, indent=2) + "\n", 0o644)
    return TrainReport(model_path, spec_path, n_rows, float(y.mean()), auc, threshold,
                       precision, recall, onnx_gap)



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(DEMO_DIR))
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    args = parser.parse_args(argv)
    report = train(args.out_dir, args.rows)
    print(f"rows={report.rows} fraud_rate={report.fraud_rate:.4f} held-out AUC={report.auc:.4f}")
    print(f"threshold={report.threshold} precision={report.precision:.3f} "
          f"recall={report.recall:.3f}")
    print(f"ONNX vs scikit-learn max |diff|={report.onnx_gap:.2e}")
    print(f"wrote {report.model_path} and {report.spec_path}")


if __name__ == "__main__":
    main()
