"""Enron-Spam (``enron1``) from a path the user gives, as bag-of-words features (Koh & Liang 2017,
§5.2).

Source: V. Metsis, I. Androutsopoulos, G. Paliouras, *Spam Filtering with Naive Bayes – Which
Naive Bayes?*, CEAS 2006; the "preprocessed" release from the AUEB Enron-Spam page
(``nlp.cs.aueb.gr/software_and_datasets/Enron-Spam/``, ``preprocessed/enron1.tar.gz``):
3,672 ham (mailbox of ``farmer-d``) + 1,500 spam messages, one per file. Licence: none stated by
the authors; the Enron mail was made public during the FERC investigation. Cite Metsis et al.
Nothing is downloaded here. Needs scikit-learn (``pip install upweight[sklearn]``).
"""

from __future__ import annotations

import csv
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ._base import PathArg, SplitData, binary_labels, listing, read_bytes, resolve_path

_WHAT = "load_enron"
_EXPECTED = (
    "the Enron-Spam tarball (e.g. enron1.tar.gz, holding <name>/ham/*.txt and <name>/spam/*.txt), "
    "a CSV (.csv or .csv.gz) with columns file, label, text, or a folder holding ham/ and spam/ "
    "(or one of those files)"
)


@dataclass(frozen=True)
class TextSplitData(SplitData):
    """A :class:`SplitData` for text: bag-of-words features plus the documents behind them.

    ``x_*`` are float32 word counts (``scipy.sparse`` CSR unless ``dense=True``),
    ``feature_names`` is the vocabulary (column order), ``docs_*`` the raw texts,
    ``files_*`` each message's file name (``"spam/0006.2003-12-18.GP.spam.txt"``) and
    ``vectorizer`` the fitted vectoriser (to transform new messages the same way).
    """

    docs_train: tuple[str, ...] = ()
    docs_test: tuple[str, ...] = ()
    files_train: tuple[str, ...] = ()
    files_test: tuple[str, ...] = ()
    vectorizer: Any = None


def _from_tar(p: Path) -> list[tuple[str, str]]:
    try:
        tar = tarfile.open(p)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(
            f"{_WHAT}: cannot open '{p}' as a tar archive ({exc}). Pass {_EXPECTED}."
        ) from exc
    out = []
    try:
        with tar:
            for m in tar.getmembers():
                parts = m.name.strip("/").split("/")
                if m.isfile() and len(parts) >= 2 and parts[-2] in ("ham", "spam"):
                    fh = tar.extractfile(m)
                    out.append((parts[-2] + "/" + parts[-1], fh.read().decode("latin-1")))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(
            f"{_WHAT}: '{p}' is a damaged tar archive ({exc}); download it again."
        ) from exc
    if not out:
        raise InputError(
            f"{_WHAT}: tar archive '{p}' holds no files under ham/ or spam/. Pass {_EXPECTED}."
        )
    return out


def _from_csv(p: Path) -> list[tuple[str, str]]:
    raw = read_bytes(p, _WHAT)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{_WHAT}: '{p}' is not UTF-8 text ({exc}); pass a CSV with columns file, label, text."
        ) from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not {"file", "label", "text"} <= set(header):
            raise InputError(
                f"{_WHAT}: CSV '{p}' must have a header row with columns file, label, text "
                f"(label 1 = spam, 0 = ham); its first row is {header!r}."
            )
        i_file, i_label, i_text = header.index("file"), header.index("label"), header.index("text")
        out = []
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise InputError(
                    f"{_WHAT}: CSV '{p}' row {line} has {len(row)} fields, the header"
                    f" {len(header)}."
                )
            if row[i_label] not in ("0", "1"):
                raise InputError(
                    f"{_WHAT}: CSV '{p}' row {line} has label {row[i_label]!r}; "
                    "expected 1 (spam) or 0 (ham)."
                )
            kind = "spam" if row[i_label] == "1" else "ham"
            name = row[i_file].replace("\\", "/").split("/")[-1]
            out.append((kind + "/" + name, row[i_text]))
    except csv.Error as exc:
        raise InputError(f"{_WHAT}: cannot parse '{p}' as CSV ({exc}).") from exc
    if not out:
        raise InputError(f"{_WHAT}: CSV '{p}' has no data rows.")
    return out


def _from_folder(p: Path) -> list[tuple[str, str]]:
    for root in (p, *sorted(d for d in p.iterdir() if d.is_dir())):
        if (root / "ham").is_dir() and (root / "spam").is_dir():
            return [
                (f"{kind}/{f.name}", f.read_bytes().decode("latin-1"))
                for kind in ("ham", "spam")
                for f in (root / kind).iterdir()
                if f.is_file()
            ]
    files = sorted(
        f
        for f in p.iterdir()
        if f.is_file() and (f.name.endswith((".tar.gz", ".tgz", ".tar", ".csv", ".csv.gz")))
    )
    if files:
        tars = [f for f in files if not f.name.endswith((".csv", ".csv.gz"))]
        return _from_tar(tars[0]) if tars else _from_csv(files[0])
    raise InputError(
        f"{_WHAT}: folder '{p}' has no ham/ and spam/ folders and no .tar.gz or .csv[.gz] file "
        f"({listing(p)}). Pass {_EXPECTED}."
    )


def _read_messages(p: Path) -> list[tuple[str, str]]:
    if p.is_dir():
        return _from_folder(p)
    name = p.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return _from_csv(p)
    if name.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
        return _from_tar(p)
    raise InputError(f"{_WHAT}: cannot tell the format of '{p}' from its name; pass {_EXPECTED}.")


def _count_vectorizer(**kwargs: Any) -> Any:
    try:
        from sklearn.feature_extraction.text import CountVectorizer
    except ImportError as exc:
        raise ImportError(
            f"{_WHAT} needs scikit-learn for its bag-of-words vectoriser: "
            "pip install upweight[sklearn]  (or: pip install scikit-learn)."
        ) from exc
    return CountVectorizer(**kwargs)


def spacy_lemmas(docs: list[str] | tuple[str, ...]) -> list[str]:
    """The release's token filter with spaCy's offline parts: each text as the space-joined
    lemmas of its tokens that are alphabetic, not a stop word and not out of vocabulary.

    The release ran ``en_core_web_sm`` (``influence/nlprocessor.py``); that model is a separate
    download. This uses what ``pip install spacy spacy-lookups-data`` ships: spaCy's English
    tokeniser and stop words (as the release), its lookup lemmatiser (a word → lemma table, where
    the model used part-of-speech rules), and, for "out of vocabulary", absence from spaCy's
    English word-probability table (``lexeme_prob``).
    """
    try:
        import spacy
        from spacy.lookups import load_lookups
    except ImportError as exc:
        raise ImportError(
            f"{_WHAT}(lemmatize=True) needs spaCy and its lookup tables: pip install"
            " upweight[lemma]  (or: pip install spacy spacy-lookups-data)."
        ) from exc
    try:
        known = load_lookups("en", ["lexeme_prob"]).get_table("lexeme_prob")
        nlp = spacy.blank("en")
        nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
        nlp.initialize()
    except (ValueError, KeyError, OSError) as exc:
        raise ImportError(
            f"{_WHAT}(lemmatize=True) needs spaCy's English lookup tables: pip install"
            f" spacy-lookups-data ({exc})."
        ) from exc
    return [
        " ".join(t.lemma_ for t in doc if t.is_alpha and not t.is_stop and t.lower_ in known)
        for doc in nlp.pipe(docs, batch_size=256)
    ]


def load_enron(
    path: PathArg,
    *,
    vectorizer: Any = None,
    min_df: int = 5,
    train_fraction: float = 0.8,
    seed: int = 0,
    labels: str = "pm1",
    dense: bool = False,
    lemmatize: bool = False,
) -> TextSplitData:
    """Load Enron-Spam as bag-of-words features with the paper's 4,137 / 1,035 split.

    Source: Metsis, Androutsopoulos & Paliouras (CEAS 2006), the AUEB "preprocessed" release
    (``enron1.tar.gz``: 3,672 ham + 1,500 spam). Licence: none stated by the authors; the Enron
    mail was made public during the FERC investigation. Cite Metsis et al. 2006.

    Mapping to the paper (§5.2, logistic regression on bag-of-words; release code
    ``scripts/load_spam.py`` and ``influence/nlprocessor.py``):

    1. List the spam messages, then the ham messages (the release's order), each sorted by
       file name (the release used ``os.listdir``, whose order is unspecified), and decode
       every file as latin-1.
    2. Shuffle the messages with ``np.random.seed(0)`` semantics (a private
       ``RandomState(seed)``; the global state is untouched).
    3. The first ``int(train_fraction · n)`` = **4,137** are train, the last **1,035** test
       (the paper's "4,147" is a typo: 4,137 + 1,035 = 5,172).
    4. Fit ``CountVectorizer(min_df=5)`` on the training texts only and transform both.

    The release first lemmatised with spaCy ``en_core_web_sm`` and dropped stop words,
    non-alphabetic and out-of-vocabulary tokens; by default this loader uses scikit-learn's
    tokeniser instead (no spaCy), so the split sizes and the vectoriser settings match but the
    exact rows and vocabulary cannot (they depend on the listing order and the spaCy version). For a
    closer stand-in pass ``lemmatize=True`` (:func:`spacy_lemmas`: spaCy's tokeniser, stop words
    and lookup lemmas; docs/reproduction.md compares the two vocabularies).

    Args:
        path: the tarball (``enron1.tar.gz``: files ``<name>/ham/*.txt``, ``<name>/spam/*.txt``),
            a CSV (``.csv`` / ``.csv.gz``, header ``file,label,text``, label 1 = spam, 0 = ham),
            or a folder holding ``ham/`` and ``spam/`` (directly or one level down) or one
            of those files.
        vectorizer: an unfitted scikit-learn text vectoriser; it is cloned, then fitted on the
            training texts. Default ``CountVectorizer(min_df=min_df)``.
        min_df: the default vectoriser's minimum document frequency (the release's 5).
        train_fraction: share of the shuffled messages used for training (0.8).
        seed: seed of the legacy numpy generator for the shuffle (the release's 0).
        labels: ``"pm1"`` (spam +1, ham −1; upweight's binary convention) or ``"01"``
            (spam 1, ham 0; the release's). Both work with upweight's binary losses.
        dense: return dense float32 arrays instead of ``scipy.sparse`` CSR matrices.
        lemmatize: vectorise :func:`spacy_lemmas` of the texts (alphabetic, non-stop,
            in-vocabulary tokens as spaCy lookup lemmas), as the release did; needs
            ``pip install upweight[lemma]``. ``docs_*`` stay the raw texts; the fitted
            ``vectorizer`` then expects lemmatised text (``spacy_lemmas(texts)``).

    Returns:
        TextSplitData: ``x_train`` (4137, V), ``x_test`` (1035, V) float32 counts,
        ``y_train``/``y_test`` int64, ``feature_names`` (the V vocabulary words),
        ``docs_*`` (texts), ``files_*`` (``"ham/…txt"`` / ``"spam/…txt"``), ``vectorizer``
        (fitted), ``source_index_*`` (position in the spam-then-ham sorted listing of step 1),
        ``name="enron"``. No validation split.

    Raises:
        InputError: a missing path, a folder or archive without ``ham/``/``spam/`` messages,
            a file of another format, a CSV without the expected columns, bad options.
        ImportError: scikit-learn is missing (``pip install upweight[sklearn]``), or spaCy
            with ``lemmatize=True`` (``pip install upweight[lemma]``).

    Examples:
        >>> d = load_enron("path/to/enron1.tar.gz")  # doctest: +SKIP
        >>> d.x_train.shape[0], d.x_test.shape[0]  # doctest: +SKIP
        (4137, 1035)
    """
    if not 0.0 < train_fraction < 1.0:
        raise InputError(
            f"{_WHAT}: train_fraction must be between 0 and 1 (the paper's 0.8); got"
            f" {train_fraction!r}."
        )
    binary_labels(np.zeros(0, bool), labels, _WHAT)  # validates `labels` before the slow part
    if vectorizer is None:
        vectorizer = _count_vectorizer(min_df=min_df)
    else:
        if not (hasattr(vectorizer, "fit") and hasattr(vectorizer, "transform")):
            raise InputError(
                f"{_WHAT}: vectorizer must be a scikit-learn text vectoriser with fit and transform"
                f" (e.g. CountVectorizer(min_df=5)); got {type(vectorizer).__name__}."
            )
        try:
            from sklearn.base import clone
        except ImportError as exc:
            raise ImportError(
                f"{_WHAT} needs scikit-learn: pip install upweight[sklearn]."
            ) from exc
        vectorizer = clone(vectorizer)

    p = resolve_path(path, _WHAT, _EXPECTED)
    messages = _read_messages(p)
    # spam first, then ham (release order), each by file name
    messages.sort(key=lambda m: (not m[0].startswith("spam/"), m[0]))
    n_spam = sum(m[0].startswith("spam/") for m in messages)
    if n_spam == 0 or n_spam == len(messages):
        raise InputError(
            f"{_WHAT}: '{p}' holds {n_spam} spam and {len(messages) - n_spam} ham messages; "
            "both classes are needed."
        )
    files = [m[0] for m in messages]
    docs = [m[1] for m in messages]
    is_spam = np.array([f.startswith("spam/") for f in files])

    n = len(docs)
    perm = np.arange(n)
    np.random.RandomState(seed).shuffle(perm)  # == np.random.seed(seed); np.random.shuffle(pairs)
    n_train = int(train_fraction * n)
    idx_train, idx_test = perm[:n_train], perm[n_train:]
    docs_train = [docs[i] for i in idx_train]
    docs_test = [docs[i] for i in idx_test]
    if lemmatize:
        lemmas = spacy_lemmas(docs_train + docs_test)
        x_train = vectorizer.fit_transform(lemmas[:n_train])
        x_test = vectorizer.transform(lemmas[n_train:])
    else:
        x_train = vectorizer.fit_transform(docs_train)
        x_test = vectorizer.transform(docs_test)
    if hasattr(x_train, "tocsr"):
        x_train, x_test = x_train.tocsr().astype(np.float32), x_test.tocsr().astype(np.float32)
        if dense:
            x_train, x_test = x_train.toarray(), x_test.toarray()
    else:
        x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
    vocab = (
        vectorizer.get_feature_names_out() if hasattr(vectorizer, "get_feature_names_out") else None
    )

    return TextSplitData(
        x_train=x_train,
        y_train=binary_labels(is_spam[idx_train], labels, _WHAT),
        x_test=x_test,
        y_test=binary_labels(is_spam[idx_test], labels, _WHAT),
        source_index_train=idx_train,
        source_index_test=idx_test,
        name="enron",
        feature_names=None if vocab is None else tuple(str(w) for w in vocab),
        docs_train=tuple(docs_train),
        docs_test=tuple(docs_test),
        files_train=tuple(files[i] for i in idx_train),
        files_test=tuple(files[i] for i in idx_test),
        vectorizer=vectorizer,
    )


__all__ = ["TextSplitData", "load_enron", "spacy_lemmas"]
