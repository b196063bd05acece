"""Diabetes 130-US hospitals (UCI) from a path the user gives, encoded as in Koh & Liang (2017,
§5.3).

Source: B. Strack et al., *Impact of HbA1c Measurement on Hospital Readmission Rates: Analysis
of 70,000 Clinical Database Patient Records*, BioMed Research International 2014, 781670;
distributed by the UCI Machine Learning Repository as "Diabetes 130-US hospitals for years
1999-2008" (dataset 296, ``dataset_diabetes.zip``). Licence: CC BY 4.0 (as UCI lists it).
Nothing is downloaded here; pandas is not needed.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DtypeError, InputError, ShapeError
from ._base import PathArg, SplitData, binary_labels, listing, load_npz, read_bytes, resolve_path

_WHAT = "load_hospital"
_EXPECTED = (
    "the UCI file diabetic_data.csv (or .csv.gz), UCI's dataset_diabetes.zip, the prepared "
    "hospital_koh2017.npz (arrays X_train, y_train, X_test, y_test, train_rows, test_rows, "
    "feature_names), or a folder holding one of them"
)
NPZ_KEYS = ("X_train", "y_train", "X_test", "y_test", "train_rows", "test_rows", "feature_names")

NUMERIC = (
    "time_in_hospital",
    "num_lab_procedures",
    "num_procedures",
    "num_medications",
    "number_outpatient",
    "number_emergency",
    "number_inpatient",
    "number_diagnoses",
)
CATEGORICAL = (
    "gender",
    "race",
    "age",
    "discharge_disposition_id",
    "max_glu_serum",
    "A1Cresult",
    "metformin",
    "repaglinide",
    "nateglinide",
    "chlorpropamide",
    "glimepiride",
    "acetohexamide",
    "glipizide",
    "glyburide",
    "tolbutamide",
    "pioglitazone",
    "rosiglitazone",
    "acarbose",
    "miglitol",
    "troglitazone",
    "tolazamide",
    "examide",
    "citoglipton",
    "insulin",
    "glyburide-metformin",
    "glipizide-metformin",
    "glimepiride-pioglitazone",
    "metformin-rosiglitazone",
    "metformin-pioglitazone",
    "change",
    "diabetesMed",
)
N_FEATURES = 127
CHILD_FEATURE = "age_[0-10)"  # the paper's "child under 10" indicator: column 17


def _csv_text(p: Path) -> str:
    """The text of diabetic_data.csv from the CSV, its .gz, or UCI's zip."""
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            names = [
                n
                for n in zf.namelist()
                if n.split("/")[-1] == "diabetic_data.csv" and not n.startswith("__MACOSX")
            ]
            if not names:
                raise InputError(
                    f"{_WHAT}: zip '{p}' has no diabetic_data.csv (it holds "
                    f"{', '.join(zf.namelist()[:6]) or 'nothing'}). Pass {_EXPECTED}."
                )
            raw = zf.read(names[0])
    else:
        raw = read_bytes(p, _WHAT)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{_WHAT}: '{p}' is not a text CSV ({exc}). Pass {_EXPECTED}.") from exc


def encode_csv(text: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Encode the raw UCI CSV text as the paper's 127 features.

    8 numeric columns as they are; 31 categorical columns one-hot, categories in sorted order
    (numerically when every value is an integer, as for ``discharge_disposition_id``), a
    column with exactly two categories keeping only its second dummy; ``?`` and ``None`` are
    ordinary categories. Label: readmitted within 30 days (``<30``).

    Returns:
        X (n, 127) float32, positive (n,) bool (``readmitted == "<30"``), feature names.

    Raises:
        InputError: columns are missing or a numeric column holds non-numbers.
    """
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None) or []
    need = NUMERIC + CATEGORICAL + ("readmitted",)
    missing = [c for c in need if c not in header]
    if missing:
        raise InputError(
            f"{_WHAT}: the CSV lacks column(s) {', '.join(missing[:6])}"
            f"{' …' if len(missing) > 6 else ''}; pass UCI's diabetic_data.csv "
            "(50 columns from encounter_id to readmitted)."
        )
    rows = [r for r in reader if r]
    if not rows:
        raise InputError(f"{_WHAT}: the CSV has a header but no data rows.")
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise InputError(
            f"{_WHAT}: CSV data row {bad + 1} has {len(rows[bad])} fields, the header"
            f" {len(header)}."
        )

    def column(name: str) -> list[str]:
        i = header.index(name)
        return [r[i] for r in rows]

    n = len(rows)
    blocks, names = [], list(NUMERIC)
    try:
        blocks.append(
            np.stack(
                [np.fromiter(map(float, column(c)), np.float64, n) for c in NUMERIC], axis=1
            ).astype(np.float32)
        )
    except ValueError as exc:
        raise InputError(
            f"{_WHAT}: a numeric column ({', '.join(NUMERIC)}) holds a non-number ({exc})."
        ) from exc
    for c in CATEGORICAL:
        values = column(c)
        cats = sorted(set(values))
        try:  # integer-coded columns sort as numbers, as pandas reads them
            cats = [str(v) for v in sorted(int(v) for v in cats)]
        except ValueError:
            pass
        code = {v: i for i, v in enumerate(cats)}
        codes = np.fromiter(map(code.__getitem__, values), np.int32, n)
        keep = np.arange(1, 2) if len(cats) == 2 else np.arange(len(cats))
        blocks.append((codes[:, None] == keep[None, :]).astype(np.float32))
        names += [f"{c}_{cats[k]}" for k in keep]
    positive = np.array([v == "<30" for v in column("readmitted")])
    return np.concatenate(blocks, axis=1), positive, tuple(names)


def balanced_split(
    positive: np.ndarray, n_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The release notebook's split: legacy ``np.random.seed(seed)``; shuffle the positive row
    indices, then the negative ones; the first ``n_per_class`` of each are train, the rest test;
    shuffle train, then test. Uses a private ``RandomState``."""
    rs = np.random.RandomState(seed)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    if min(len(pos), len(neg)) < n_per_class:
        raise InputError(
            f"{_WHAT}: n_train_per_class={n_per_class} but the data has only {len(pos)} positive "
            f"and {len(neg)} negative rows; pass a smaller n_train_per_class."
        )
    rs.shuffle(pos)
    rs.shuffle(neg)
    train = np.concatenate([pos[:n_per_class], neg[:n_per_class]])
    test = np.concatenate([pos[n_per_class:], neg[n_per_class:]])
    rs.shuffle(train)
    rs.shuffle(test)
    return train, test


def _from_npz(p: Path) -> dict[str, np.ndarray]:
    a = load_npz(p, _WHAT, NPZ_KEYS, _EXPECTED)
    names = a["feature_names"]
    if names.dtype.kind != "U" or names.shape != (N_FEATURES,):
        raise ShapeError(
            f"{_WHAT}: feature_names in '{p}' must be {N_FEATURES} strings; got {names.dtype} "
            f"{names.shape}."
        )
    for part in ("train", "test"):
        x, y, rows = a[f"X_{part}"], a[f"y_{part}"], a[f"{part}_rows"]
        if x.dtype.kind != "f" or y.dtype.kind not in "iub" or rows.dtype.kind not in "iu":
            raise DtypeError(
                f"{_WHAT}: X_{part}, y_{part}, {part}_rows in '{p}' must be float, integer 0/1 and "
                f"integer; got {x.dtype}, {y.dtype}, {rows.dtype}."
            )
        if (
            x.ndim != 2
            or x.shape[1] != N_FEATURES
            or y.shape != (len(x),)
            or rows.shape != (len(x),)
        ):
            raise ShapeError(
                f"{_WHAT}: in '{p}', X_{part} must be (n, {N_FEATURES}) and y_{part}, {part}_rows "
                f"(n,); got {x.shape}, {y.shape}, {rows.shape}."
            )
        if not np.isin(y, (0, 1)).all():
            raise InputError(
                f"{_WHAT}: y_{part} in '{p}' must be 0/1 (1 = readmitted within 30 days)."
            )
    return a


def load_hospital(
    path: PathArg,
    *,
    labels: str = "pm1",
    n_train_per_class: int = 10_000,
    seed: int = 2,
) -> SplitData:
    """Load the hospital-readmission data with the paper's 127 features and balanced 20K split.

    Source: Strack et al. (BioMed Research International 2014), UCI Machine Learning Repository
    "Diabetes 130-US hospitals for years 1999-2008" (``dataset_diabetes.zip``; 101,766
    encounters × 50 columns). Licence: CC BY 4.0 (as UCI lists it).

    Mapping to the paper (§5.3 "debugging domain mismatch"; release notebook
    ``scripts/hospital_readmission.ipynb``):

    * Features (127): 8 numeric columns kept as they are (``time_in_hospital``,
      ``num_lab_procedures``, ``num_procedures``, ``num_medications``, ``number_outpatient``,
      ``number_emergency``, ``number_inpatient``, ``number_diagnoses``) and 31 categorical
      columns one-hot (``gender, race, age, discharge_disposition_id, max_glu_serum,
      A1Cresult``, the 23 medications, ``change, diabetesMed``), categories in sorted order,
      two-category columns keeping only their second dummy; ``?`` and ``None`` are categories.
      Column 17, ``age_[0-10)``, is the paper's "child under 10" indicator.
    * Label: readmitted within 30 days (``<30``) is positive, ``>30`` and ``NO`` negative.
    * Split: ``np.random.seed(2)``; shuffle positive, then negative row indices; the first
      10,000 of each are train (balanced **20,000**), the rest test (**81,766**: 1,357
      positive, 80,409 negative); shuffle train, then test. The training set has 24 children,
      3 of them readmitted ("3/24 children were readmitted" in the notebook).

    From the CSV or zip the encoding and split are computed here (a few seconds); from the prepared
    ``hospital_koh2017.npz`` they are read as stored (identical arrays).

    Args:
        path: UCI's ``diabetic_data.csv`` (or ``.csv.gz``), ``dataset_diabetes.zip``, the
            prepared ``hospital_koh2017.npz``, or a folder holding one of them (the .npz is
            preferred, then the CSV, then the zip).
        labels: ``"pm1"`` (readmitted +1, else −1; the release code's) or ``"01"`` (1/0, as
            stored in the .npz). Both work with upweight's binary losses.
        n_train_per_class: training rows per class (the paper's 10,000). Only for CSV/zip input.
        seed: seed of the legacy numpy generator for the split (the paper's 2). Only for CSV/zip.

    Returns:
        SplitData: ``x_train`` (20000, 127) and ``x_test`` (81766, 127) float32 (counts and
        0/1 indicators, not scaled), ``y_train``/``y_test`` int64, ``source_index_*`` (0-based
        data row of ``diabetic_data.csv``, header excluded), ``feature_names`` (127 names, e.g.
        ``"age_[0-10)"``), ``name="hospital"``. No validation split.

    Raises:
        InputError: a missing path, a folder without the files, a file of another format, a
            CSV without the expected columns, an .npz without the expected arrays, bad options.
            ShapeError / DtypeError for .npz arrays of the wrong shape or dtype.

    Examples:
        >>> d = load_hospital("path/to/hospital_koh2017.npz")  # doctest: +SKIP
        >>> d.x_train.shape, d.feature_names[17]  # doctest: +SKIP
        ((20000, 127), 'age_[0-10)')
    """
    binary_labels(np.zeros(0, bool), labels, _WHAT)
    if not isinstance(n_train_per_class, (int, np.integer)) or n_train_per_class < 1:
        raise InputError(
            f"{_WHAT}: n_train_per_class must be a positive integer (the paper's 10,000); "
            f"got {n_train_per_class!r}."
        )
    p = resolve_path(path, _WHAT, _EXPECTED)
    if p.is_dir():
        for name in (
            "hospital_koh2017.npz",
            "diabetic_data.csv.gz",
            "diabetic_data.csv",
            "dataset_diabetes.zip",
        ):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise InputError(
                f"{_WHAT}: folder '{p}' has none of hospital_koh2017.npz, diabetic_data.csv[.gz], "
                f"dataset_diabetes.zip ({listing(p)}). Pass {_EXPECTED}."
            )

    if p.name.lower().endswith(".npz"):
        if (n_train_per_class, seed) != (10_000, 2):
            raise InputError(
                f"{_WHAT}: '{p}' stores the paper's fixed split; to re-split with "
                f"n_train_per_class={n_train_per_class}, seed={seed}, pass the raw CSV or zip."
            )
        a = _from_npz(p)
        x_train, x_test = a["X_train"].astype(np.float32), a["X_test"].astype(np.float32)
        pos_train, pos_test = a["y_train"] == 1, a["y_test"] == 1
        idx_train, idx_test = a["train_rows"].astype(np.int64), a["test_rows"].astype(np.int64)
        names = tuple(str(s) for s in a["feature_names"])
    elif p.name.lower().endswith((".csv", ".csv.gz", ".zip")) or zipfile.is_zipfile(p):
        x, positive, names = encode_csv(_csv_text(p))
        if x.shape[1] != N_FEATURES:
            raise ShapeError(
                f"{_WHAT}: encoding '{p}' gave {x.shape[1]} features, not the paper's {N_FEATURES};"
                " the file's categories differ from UCI's diabetic_data.csv (101,766 rows)."
            )
        idx_train, idx_test = balanced_split(positive, n_train_per_class, seed)
        x_train, x_test = x[idx_train], x[idx_test]
        pos_train, pos_test = positive[idx_train], positive[idx_test]
    else:
        raise InputError(
            f"{_WHAT}: cannot tell the format of '{p}' from its name; pass {_EXPECTED}."
        )

    return SplitData(
        x_train=x_train,
        y_train=binary_labels(pos_train, labels, _WHAT),
        x_test=x_test,
        y_test=binary_labels(pos_test, labels, _WHAT),
        source_index_train=idx_train,
        source_index_test=idx_test,
        name="hospital",
        feature_names=names,
    )


__all__ = ["CHILD_FEATURE", "load_hospital"]
