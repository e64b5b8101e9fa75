"""Labels a person can read: top terms by class-based TF-IDF, representative tickets, dominant Jira fields.

c-TF-IDF is BERTopic's idea (Grootendorst 2022): all members of a cluster
form one "class document"; a term's weight is its frequency in the class
(L1-normalised) times log(1 + A / f), where A is the average number of
words per class and f the term's frequency over all classes, so words that
every cluster uses ("hadoop", "error") sink and words one cluster uses rise.
It is the ~20 lines below over scikit-learn's CountVectorizer rather than
BERTopic itself: BERTopic would bring umap-learn, numba, pynndescent, hdbscan
and plotly for one formula, and its pipeline wants to own the clustering.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

TOP_TERMS = 10
REPRESENTATIVES = 5
# Characters of a ticket read for its terms: descriptions carry long stack
# traces and logs; the first 2,000 characters hold the words that name the
# problem and keep the vectorizer at ~15 s for 100k tickets on 2 cores.
MAX_LABEL_CHARS = 2000
# Words only (no numbers, hex ids or single letters), at least 3 characters.
TOKEN_PATTERN = r"(?u)\b[^\W\d_][^\W\d_][^\W\d_]+\b"
# Besides English stop words: the package-path and URL tokens of stack traces
# and links ("at org.apache.hadoop...", "https://..."). They name no problem,
# yet topped the labels of trace-heavy clusters ("java · org · lang · apache").
TICKET_STOP_WORDS = ("java", "org", "apache", "lang", "com", "http", "https", "www", "html", "jar", "sun", "util")
# The Jira fields whose shares are shown per cluster: (name shown, metadata key, is a list).
FIELDS = (("component", "components", True), ("issue_type", "issue_type", False), ("priority", "priority", False))
TOP_FIELD_VALUES = 3


def class_tfidf(texts: Sequence[str], labels: np.ndarray, n_clusters: int, *, top: int = TOP_TERMS
                ) -> list[list[list[Any]]]:
    """[[term, weight], ...] per cluster number (best first); outliers (label < 0) are left out."""
    from scipy import sparse
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer
    from sklearn.preprocessing import normalize

    keep = np.flatnonzero(labels >= 0)
    if n_clusters == 0 or len(keep) == 0:
        return [[] for _ in range(n_clusters)]
    docs = [texts[i][:MAX_LABEL_CHARS] for i in keep]
    vectorizer = CountVectorizer(stop_words=[*ENGLISH_STOP_WORDS, *TICKET_STOP_WORDS], token_pattern=TOKEN_PATTERN,
                                 lowercase=True,
                                 min_df=2 if len(docs) >= 50 else 1, dtype=np.float32)
    try:
        counts = vectorizer.fit_transform(docs)
    except ValueError:  # no word at all (empty or numbers-only texts)
        return [[] for _ in range(n_clusters)]
    membership = sparse.csr_matrix(
        (np.ones(len(keep), dtype=np.float32), (labels[keep], np.arange(len(keep)))), shape=(n_clusters, len(keep))
    )
    tf = (membership @ counts).toarray()
    average_words = tf.sum() / n_clusters
    frequency = tf.sum(axis=0)
    idf = np.log(1.0 + average_words / np.maximum(frequency, 1e-12))
    weights = normalize(tf, norm="l1", axis=1) * idf
    vocabulary = vectorizer.get_feature_names_out()
    out = []
    for row in weights:
        best = np.argsort(-row, kind="stable")[:top]
        out.append([[str(vocabulary[i]), round(float(row[i]), 5)] for i in best if row[i] > 0])
    return out


def representatives(labels: np.ndarray, strengths: np.ndarray, similarity: np.ndarray, n_clusters: int,
                    *, top: int = REPRESENTATIVES) -> list[np.ndarray]:
    """Row numbers of each cluster's most representative members: highest strength, then nearest the centroid.

    `similarity` is each row's cosine to its own cluster's centroid (for
    KMeans the strength itself); nan strengths count as lowest.
    """
    strength = np.nan_to_num(strengths, nan=-1.0)
    out = []
    for c in range(n_clusters):
        rows = np.flatnonzero(labels == c)
        order = np.lexsort((-similarity[rows], -strength[rows]))
        out.append(rows[order[:top]])
    return out


def field_shares(metadata: Sequence[dict], labels: np.ndarray, n_clusters: int) -> list[dict[str, list]]:
    """Per cluster: {"component": [[value, share], ...], "issue_type": ..., "priority": ...}, top values first.

    A share is the fraction of the cluster's tickets with that value (a
    ticket with two components counts for both), rounded to 3 places.
    """
    counters = [{name: Counter() for name, _, _ in FIELDS} for _ in range(n_clusters)]
    sizes = np.bincount(labels[labels >= 0], minlength=n_clusters)
    for meta, label in zip(metadata, labels):
        if label < 0:
            continue
        meta = meta or {}
        for name, key, many in FIELDS:
            value = meta.get(key)
            values = value if many and isinstance(value, list) else [value]
            for v in values:
                if v not in (None, ""):
                    counters[label][name][str(v)] += 1
    return [
        {name: [[value, round(count / max(int(sizes[c]), 1), 3)]
                for value, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_FIELD_VALUES]]
         for name, counter in counters[c].items()}
        for c in range(n_clusters)
    ]
