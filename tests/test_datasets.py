"""upweight.datasets loaders on the real files in ../shared/data: sizes, splits and counts as the
data READMEs state them, equality across input formats, and a clear error for each bad input."""

from __future__ import annotations

import gzip
import io
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data, skip_without_data
from upweight.datasets import (
    SplitData,
    TextSplitData,
    load_enron,
    load_hospital,
    load_mnist,
    load_mnist_1v7,
    read_idx,
)
from upweight.datasets.hospital import balanced_split
from upweight.errors import DtypeError, InputError, ShapeError

DATA = shared_data()  # $UPWEIGHT_DATA, else the repository's ../shared/data


@pytest.fixture(scope="session")
def data_dir() -> Path:
    skip_without_data(DATA, "the real-data folder")
    return DATA


def _sub(data_dir: Path, name: str) -> Path:
    p = data_dir / name
    skip_without_data(p, name)
    return p


# ── MNIST ────────────────────────────────────────────────────────────────────────────────────

MNIST_55K_COUNTS = [5444, 6179, 5470, 5638, 5307, 4987, 5417, 5715, 5389, 5454]
MNIST_60K_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_dir(data_dir):
    return _sub(data_dir, "mnist")


@pytest.fixture(scope="module")
def mnist_paper(mnist_dir):
    return load_mnist(mnist_dir)  # from the four IDX .gz files


def test_mnist_paper_split_from_idx(mnist_paper):
    d = mnist_paper
    assert isinstance(d, SplitData) and d.name == "mnist" and d.image_shape == (28, 28)
    assert (
        d.x_train.shape == (55000, 784)
        and d.x_val.shape == (5000, 784)
        and d.x_test.shape == (10000, 784)
    )
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert 0.0 <= d.x_train.min() and d.x_train.max() == 1.0
    np.testing.assert_array_equal(d.source_index_train, np.arange(5000, 60000))
    np.testing.assert_array_equal(d.source_index_val, np.arange(5000))
    assert np.bincount(d.y_train).tolist() == MNIST_55K_COUNTS
    assert np.bincount(d.y_test).tolist() == MNIST_TEST_COUNTS
    assert (np.bincount(d.y_train) + np.bincount(d.y_val)).tolist() == MNIST_60K_COUNTS
    assert d.y_val[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # first MNIST training labels
    assert d.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    pixels = np.rint(np.concatenate([d.x_val, d.x_train]).astype(np.float64) * 255)  # back to 0–255
    np.testing.assert_allclose(
        pixels / 255, np.concatenate([d.x_val, d.x_train]), rtol=0, atol=1e-7
    )
    assert abs(pixels.mean() / 255 - 0.1306604762738429) < 1e-12  # the README's 60k pixel mean


def test_mnist_npz_equals_idx_and_full_split(mnist_dir, mnist_paper, tmp_path):
    d = load_mnist(mnist_dir / "mnist.npz", flatten=False)
    assert d.x_train.shape == (55000, 28, 28)
    np.testing.assert_array_equal(d.x_train.reshape(55000, -1), mnist_paper.x_train)
    np.testing.assert_array_equal(d.x_test.reshape(10000, -1), mnist_paper.x_test)
    np.testing.assert_array_equal(d.y_train, mnist_paper.y_train)
    full = load_mnist(mnist_dir / "mnist.npz", split="full")
    assert full.name == "mnist_full" and full.x_train.shape == (60000, 784) and full.x_val is None
    assert np.bincount(full.y_train).tolist() == MNIST_60K_COUNTS
    folder = tmp_path / "only_npz"
    folder.mkdir()
    (folder / "mnist.npz").symlink_to(mnist_dir / "mnist.npz")  # a folder holding just mnist.npz
    np.testing.assert_array_equal(load_mnist(folder, subset="1v7").y_test, load_mnist_1v7().y_test)


def test_mnist_1v7_reproduces_the_bundled_set(mnist_dir):
    d, b = load_mnist(mnist_dir, subset="1v7"), load_mnist_1v7()
    assert d.name == "mnist_1v7" and d.x_val is None
    assert d.x_train.shape == (11800, 784) and d.x_test.shape == (2100, 784)
    for field in (
        "x_train",
        "y_train",
        "x_test",
        "y_test",
        "source_index_train",
        "source_index_test",
    ):
        np.testing.assert_array_equal(getattr(d, field), getattr(b, field), err_msg=field)
    assert set(d.y_train.tolist()) == {-1, 1}


def test_mnist_small10pct_matches_release_code(mnist_dir, mnist_paper):
    before = np.random.get_state()[1].copy()
    d = load_mnist(mnist_dir / "mnist.npz", subset="small10pct")
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # global generator untouched
    assert d.x_train.shape == (5500, 784) and d.name == "mnist_small10pct"
    assert (d.source_index_train[:4] - 5000).tolist() == [2921, 53711, 27402, 14832]
    assert np.bincount(d.y_train).tolist() == [536, 612, 588, 523, 533, 474, 576, 569, 570, 519]
    # the release code's own recipe, on the global legacy generator
    state = np.random.get_state()
    try:
        np.random.seed(0)
        perm = np.arange(55000)
        np.random.shuffle(perm)
    finally:
        np.random.set_state(state)
    np.testing.assert_array_equal(d.source_index_train, perm[:5500] + 5000)
    np.testing.assert_array_equal(d.x_train, mnist_paper.x_train[perm[:5500]])
    np.testing.assert_array_equal(d.x_val, mnist_paper.x_val)
    np.testing.assert_array_equal(d.x_test, mnist_paper.x_test)


def test_read_idx(mnist_dir):
    y = read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert (
        y.shape == (10000,) and y.dtype == np.uint8 and np.bincount(y).tolist() == MNIST_TEST_COUNTS
    )


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_mnist_errors(tmp_path, mnist_dir):
    with pytest.raises(InputError, match="no such file or folder.*four MNIST IDX files"):
        load_mnist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="lacks train-images-idx3-ubyte.*it is empty"):
        load_mnist(tmp_path / "empty")
    part = tmp_path / "part"
    part.mkdir()
    (part / "train-labels-idx1-ubyte.gz").write_bytes(
        (mnist_dir / "train-labels-idx1-ubyte.gz").read_bytes()
    )
    with pytest.raises(InputError, match="lacks train-images-idx3-ubyte.*t10k-labels"):
        load_mnist(part)
    with pytest.raises(InputError, match="single IDX file.*read_idx"):
        load_mnist(part / "train-labels-idx1-ubyte.gz")
    text = tmp_path / "notes.npz"
    text.write_text("not an archive\n")
    with pytest.raises(InputError, match="cannot read .* as an .npz archive"):
        load_mnist(text)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(InputError, match="single .npy array"):
        load_mnist(tmp_path / "one.npy")
    with pytest.raises(
        InputError, match="lacks array\\(s\\) y_test.*it has x_test, x_train, y_train"
    ):
        load_mnist(_write_npz(tmp_path / "k.npz", x_train=0, y_train=0, x_test=0))
    x, y = np.zeros((6000, 28, 28), np.uint8), np.zeros(6000, np.uint8)
    with pytest.raises(DtypeError, match="x_train .* float32; expected the raw uint8"):
        load_mnist(
            _write_npz(
                tmp_path / "f.npz", x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y
            )
        )
    with pytest.raises(ShapeError, match=r"x_test .* shape \(6000, 28, 27\)"):
        load_mnist(
            _write_npz(tmp_path / "s.npz", x_train=x, y_train=y, x_test=x[:, :, :27], y_test=y)
        )
    with pytest.raises(ShapeError, match=r"y_train .* expected \(6000,\)"):
        load_mnist(_write_npz(tmp_path / "y.npz", x_train=x, y_train=y[:10], x_test=x, y_test=y))
    with pytest.raises(ShapeError, match="needs more than 5000"):
        load_mnist(
            _write_npz(tmp_path / "small.npz", x_train=x[:100], y_train=y[:100], x_test=x, y_test=y)
        )
    with pytest.raises(InputError, match="split must be 'paper'"):
        load_mnist(mnist_dir, split="train")
    with pytest.raises(InputError, match="subset must be None, '1v7' or 'small10pct'"):
        load_mnist(mnist_dir, subset="3v8")
    with pytest.raises(InputError, match="use split='paper'"):
        load_mnist(mnist_dir, split="full", subset="1v7")


def test_read_idx_errors(tmp_path):
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(InputError, match="not an MNIST IDX file"):
        read_idx(bad)
    cut = tmp_path / "cut-idx1-ubyte"
    cut.write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(10))
    with pytest.raises(
        InputError, match=r"truncated or damaged: its header gives shape \(100,\) but it holds 10"
    ):
        read_idx(cut)
    fake = tmp_path / "fake.gz"
    fake.write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(InputError, match="looks gzipped but cannot be decompressed"):
        read_idx(fake)


# ── Enron ────────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def enron_dir(data_dir):
    pytest.importorskip("sklearn")
    return _sub(data_dir, "enron1")


@pytest.fixture(scope="module")
def enron_tar(enron_dir):
    return load_enron(enron_dir / "enron1.tar.gz")


def test_enron_from_tarball(enron_tar):
    import scipy.sparse

    d = enron_tar
    assert isinstance(d, TextSplitData) and isinstance(d, SplitData) and d.name == "enron"
    assert d.x_train.shape[0] == 4137 and d.x_test.shape[0] == 1035  # README: int(0.8·5172) / rest
    assert scipy.sparse.issparse(d.x_train) and d.x_train.dtype == np.float32
    v = len(d.feature_names)
    assert d.x_train.shape[1] == d.x_test.shape[1] == v == len(d.vectorizer.vocabulary_)
    assert d.vectorizer.min_df == 5
    assert ((d.x_train > 0).sum(axis=0) >= 5).all()  # min_df = 5 on the training docs
    y = np.concatenate([d.y_train, d.y_test])
    assert set(y.tolist()) == {-1, 1} and (y == 1).sum() == 1500 and (y == -1).sum() == 3672
    files = d.files_train + d.files_test
    assert len(set(files)) == 5172
    assert all((f.startswith("spam/") == (lab == 1)) for f, lab in zip(files, y))
    assert len(d.docs_train) == 4137 and d.docs_train[0].startswith("Subject:")
    # shuffle = release code: np.random.seed(0); np.random.shuffle(list of pairs), spam listed first
    state = np.random.get_state()
    try:
        np.random.seed(0)
        order = list(range(5172))
        np.random.shuffle(order)
    finally:
        np.random.set_state(state)
    np.testing.assert_array_equal(
        np.concatenate([d.source_index_train, d.source_index_test]), order
    )
    listing = sorted(f for f in files if f.startswith("spam/")) + sorted(
        f for f in files if f.startswith("ham/")
    )
    assert [listing[i] for i in d.source_index_train[:50]] == list(d.files_train[:50])


def test_enron_csv_and_folder_equal_tarball(enron_dir, enron_tar):
    for src in (enron_dir / "enron1.csv.gz", enron_dir):  # the folder holds the tarball
        d = load_enron(src)
        assert d.files_train == enron_tar.files_train and d.files_test == enron_tar.files_test
        assert d.docs_test == enron_tar.docs_test
        assert d.feature_names == enron_tar.feature_names
        assert (d.x_train != enron_tar.x_train).nnz == 0 and (d.x_test != enron_tar.x_test).nnz == 0
        np.testing.assert_array_equal(d.y_train, enron_tar.y_train)


def _tiny_enron(root: Path) -> Path:
    for kind, words in (("ham", "meeting schedule report"), ("spam", "cheap offer money")):
        (root / "enron9" / kind).mkdir(parents=True)
        for i in range(5):
            (root / "enron9" / kind / f"{i:04d}.x.{kind}.txt").write_bytes(
                f"Subject: {words.split()[i % 3]}\r\n{words} caf\xe9\r\n".encode("latin-1")
            )
    return root


def test_enron_folder_options_and_custom_vectorizer(tmp_path):
    CountVectorizer = pytest.importorskip("sklearn.feature_extraction.text").CountVectorizer

    root = _tiny_enron(tmp_path)
    d = load_enron(root, min_df=1, labels="01", dense=True)  # ham/ and spam/ one level down
    assert isinstance(d.x_train, np.ndarray) and d.x_train.dtype == np.float32
    assert d.x_train.shape[0] == 8 and d.x_test.shape[0] == 2
    assert set(np.concatenate([d.y_train, d.y_test]).tolist()) == {0, 1}
    assert "café" in d.feature_names  # latin-1 decoding
    mine = CountVectorizer(min_df=1, stop_words="english", binary=True)
    e = load_enron(root / "enron9", vectorizer=mine, train_fraction=0.5)
    assert not hasattr(mine, "vocabulary_")  # the user's vectoriser is cloned, not fitted
    assert e.vectorizer.binary and e.x_train.shape[0] == 5 and e.x_train.max() == 1


def test_enron_errors(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    with pytest.raises(InputError, match="no such file or folder.*tarball"):
        load_enron(tmp_path / "missing.tar.gz")
    with pytest.raises(InputError, match="no ham/ and spam/ folders.*it is empty"):
        load_enron(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(InputError, match="cannot tell the format"):
        load_enron(notes)
    bad_tar = tmp_path / "bad.tar.gz"
    bad_tar.write_bytes(gzip.compress(b"this is no tar archive" * 10))
    with pytest.raises(InputError, match="cannot open .* as a tar archive"):
        load_enron(bad_tar)
    empty_tar = tmp_path / "other.tar.gz"
    with tarfile.open(empty_tar, "w:gz") as tar:
        info = tarfile.TarInfo("enron1/Summary.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(InputError, match="holds no files under ham/ or spam/"):
        load_enron(empty_tar)
    csv_bad = tmp_path / "mail.csv"
    csv_bad.write_text("name,spam,body\na,1,hi\n")
    with pytest.raises(InputError, match="columns file, label, text"):
        load_enron(csv_bad)
    csv_label = tmp_path / "mail2.csv"
    csv_label.write_text("file,label,text\nham/a.txt,ham,hi\n")
    with pytest.raises(
        InputError, match="row 2 has label 'ham'; expected 1 \\(spam\\) or 0 \\(ham\\)"
    ):
        load_enron(csv_label)
    one_class = tmp_path / "mail3.csv"
    one_class.write_text("file,label,text\nham/a.txt,0,hi\nham/b.txt,0,yo\n")
    with pytest.raises(InputError, match="0 spam and 2 ham messages; both classes"):
        load_enron(one_class)
    with pytest.raises(InputError, match="train_fraction must be between 0 and 1"):
        load_enron(one_class, train_fraction=1.5)
    with pytest.raises(InputError, match="labels must be 'pm1'"):
        load_enron(one_class, labels="+-")
    with pytest.raises(InputError, match="vectorizer must be a scikit-learn text vectoriser"):
        load_enron(one_class, vectorizer="tfidf")
    monkeypatch.setitem(sys.modules, "sklearn.feature_extraction.text", None)
    with pytest.raises(ImportError, match=r"pip install upweight\[sklearn\]"):
        load_enron(one_class)


# ── Hospital ─────────────────────────────────────────────────────────────────────────────────

SPLIT_FIELDS = ("x_train", "y_train", "x_test", "y_test", "source_index_train", "source_index_test")


@pytest.fixture(scope="module")
def hospital_dir(data_dir):
    return _sub(data_dir, "hospital")


@pytest.fixture(scope="module")
def hospital_npz(hospital_dir):
    return load_hospital(hospital_dir / "hospital_koh2017.npz")


def test_hospital_prepared_npz(hospital_npz, hospital_dir):
    d = hospital_npz
    assert d.name == "hospital" and d.x_val is None
    assert (
        d.x_train.shape == (20000, 127)
        and d.x_test.shape == (81766, 127)
        and d.x_train.dtype == np.float32
    )
    assert len(d.feature_names) == 127 and d.feature_names[17] == "age_[0-10)"
    assert d.feature_names[:8] == (
        "time_in_hospital",
        "num_lab_procedures",
        "num_procedures",
        "num_medications",
        "number_outpatient",
        "number_emergency",
        "number_inpatient",
        "number_diagnoses",
    )
    assert (d.y_train == 1).sum() == 10000 and (d.y_train == -1).sum() == 10000  # balanced 20K
    assert (d.y_test == 1).sum() == 1357 and (d.y_test == -1).sum() == 80409
    kids = d.x_train[:, 17] == 1
    assert kids.sum() == 24 and (d.y_train[kids] == 1).sum() == 3  # "3/24 children were readmitted"
    assert (kids & (d.y_train == -1)).sum() == 21  # the mismatch experiment removes 20 of these 21
    assert (d.x_test[:, 17] == 1).sum() == 137  # the notebook's 137 test children
    # the paper's test child, not readmitted
    assert d.x_test[1742, 17] == 1 and d.y_test[1742] == -1
    rows = np.concatenate([d.source_index_train, d.source_index_test])
    assert np.array_equal(np.sort(rows), np.arange(101766))  # every CSV row exactly once
    raw = np.load(hospital_dir / "hospital_koh2017.npz")
    zo = load_hospital(hospital_dir, labels="01")  # the folder: the .npz is preferred
    np.testing.assert_array_equal(zo.y_train, raw["y_train"])
    np.testing.assert_array_equal(d.y_test, 2 * raw["y_test"].astype(np.int64) - 1)
    # the split is the README's recipe (seed 2, positives then negatives), re-run on the labels
    positive = np.zeros(101766, bool)
    positive[rows] = np.concatenate([d.y_train, d.y_test]) == 1
    assert positive.sum() == 11357  # readmitted "<30"
    tr, te = balanced_split(positive, 10000, 2)
    np.testing.assert_array_equal(tr, d.source_index_train)
    np.testing.assert_array_equal(te, d.source_index_test)


@pytest.mark.parametrize("name", ["diabetic_data.csv.gz", "dataset_diabetes.zip"])
def test_hospital_from_raw_equals_prepared(hospital_dir, hospital_npz, name):
    d = load_hospital(hospital_dir / name)  # encodes the 101,766 × 50 CSV and re-splits it
    assert d.feature_names == hospital_npz.feature_names
    for field in SPLIT_FIELDS:
        np.testing.assert_array_equal(
            getattr(d, field), getattr(hospital_npz, field), err_msg=field
        )
    kids = np.concatenate([d.x_train[:, 17], d.x_test[:, 17]]) == 1
    assert kids.sum() == 161  # README: "[0-10) has 161 rows"


def test_hospital_errors(tmp_path, hospital_dir):
    with pytest.raises(InputError, match="no such file or folder.*diabetic_data.csv"):
        load_hospital(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="has none of hospital_koh2017.npz.*it is empty"):
        load_hospital(tmp_path)
    text = tmp_path / "h.npz"
    text.write_text("x,y\n1,2\n")
    with pytest.raises(InputError, match="cannot read .* as an .npz archive"):
        load_hospital(text)
    with pytest.raises(InputError, match="lacks array\\(s\\) y_train.*feature_names"):
        load_hospital(_write_npz(tmp_path / "k.npz", X_train=np.zeros((2, 127), np.float32)))
    names = np.array([f"f{i}" for i in range(127)])
    ok = dict(
        X_train=np.zeros((4, 127), np.float32),
        y_train=np.zeros(4, np.int8),
        X_test=np.zeros((2, 127), np.float32),
        y_test=np.zeros(2, np.int8),
        train_rows=np.arange(4),
        test_rows=np.arange(2),
        feature_names=names,
    )
    with pytest.raises(ShapeError, match=r"X_train must be \(n, 127\).*\(4, 126\)"):
        load_hospital(
            _write_npz(tmp_path / "s.npz", **{**ok, "X_train": np.zeros((4, 126), np.float32)})
        )
    with pytest.raises(DtypeError, match="must be float, integer 0/1 and integer"):
        load_hospital(_write_npz(tmp_path / "d.npz", **{**ok, "y_train": np.array(["a"] * 4)}))
    assert load_hospital(_write_npz(tmp_path / "good.npz", **ok)).x_train.shape == (4, 127)
    csv_bad = tmp_path / "diabetic_data.csv"
    csv_bad.write_text("encounter_id,race,gender\n1,Caucasian,Female\n")
    with pytest.raises(InputError, match="lacks column\\(s\\) time_in_hospital"):
        load_hospital(csv_bad)
    z = tmp_path / "dataset_diabetes.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("dataset_diabetes/IDs_mapping.csv", "a,b\n")
    with pytest.raises(InputError, match="has no diabetic_data.csv"):
        load_hospital(z)
    with pytest.raises(InputError, match="cannot tell the format"):
        load_hospital(_write_text(tmp_path / "data.json", "{}"))
    with pytest.raises(InputError, match="stores the paper's fixed split"):
        load_hospital(hospital_dir / "hospital_koh2017.npz", seed=3)
    with pytest.raises(InputError, match="labels must be 'pm1'"):
        load_hospital(hospital_dir, labels="yes/no")
    with pytest.raises(InputError, match="only 3 positive"):
        balanced_split(np.array([True] * 3 + [False] * 10), 5, 0)


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
