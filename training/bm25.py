"""The keyword side of query-by-ticket search: BM25 over the stored tsvectors, the title weighted (BM25F-style).

A ticket as the query (similar tickets, the ../shared/DATA.md duplicate
protocol) is long: a summary and a description full of logs and stack
traces. Its summary says what the ticket is about, so a lexeme from the
title counts QUERY_TITLE_WEIGHT times in the query and a title occurrence
counts TITLE_WEIGHT times in a document's term frequency and length (the
simple BM25F of Robertson et al. 2004, as duplicate-report retrieval uses
it). Chosen on the Hadoop file's TRAIN clusters, the TEST figure only
reported (`python -m bench keyword`, docs/benchmarks.md): plain BM25
0.4101 -> 0.4443 nDCG@10 there with both weights 2.

Candidates: a document is scored when it holds one of the query's rarest
lexemes, taken in order of document frequency until their frequencies sum
past candidate_cap (settings.BM25_CANDIDATES): the work per query is bounded
by the cap, not by the dataset. The held-out evaluation applies the same
rule with the same numbers, so the keyword and `served` rows are what the
similar-tickets page serves. One definition of the formula and the rule,
used by training.evaluation (matrices over every document) and
search.keyword.ticket_keyword_ranking (SQL over one ticket's candidates).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

K1 = 1.2
B = 0.75
# A title occurrence counts this many times in a document's term frequency and length.
TITLE_WEIGHT = 2
# A query lexeme found in the query ticket's title weighs this much; one only in its body weighs 1.
QUERY_TITLE_WEIGHT = 2

# A lexeme's document_tf() in SQL, over a row `u` of unnest(tsvector): title positions carry weight A.
TF_SQL = f"(cardinality(u.positions) + {TITLE_WEIGHT - 1} * cardinality(array_positions(u.weights, 'A')))"
# A document's length, the sum of its lexemes' document_tf(), over training_document `d`.
DOCUMENT_LENGTH_SQL = f"SELECT coalesce(sum({TF_SQL}), 0) FROM unnest(d.search_vector) u"

# 'lexeme':1A,5B,7 in a tsvector's text form; weight A is the title (training.versions).
_LEXEME = re.compile(r"'((?:[^']|'')*)':([0-9A-D,]+)")


def field_counts(tsvector_text: str) -> dict[str, tuple[int, int]]:
    """Lexeme -> (occurrences in the title (weight A), occurrences elsewhere), from a tsvector's text form."""
    out: dict[str, tuple[int, int]] = {}
    for match in _LEXEME.finditer(tsvector_text or ""):
        positions = match.group(2).split(",")
        title = sum(1 for p in positions if p.endswith("A"))
        out[match.group(1).replace("''", "'")] = (title, len(positions) - title)
    return out


def document_tf(title: int, other: int) -> int:
    """A lexeme's term frequency in a document: title occurrences count TITLE_WEIGHT times."""
    return TITLE_WEIGHT * title + other


def query_weight(title: int) -> float:
    """A query lexeme's weight: QUERY_TITLE_WEIGHT when the query ticket's title holds it, else 1."""
    return float(QUERY_TITLE_WEIGHT) if title else 1.0


def idf(documents: int, frequency: int) -> float:
    """BM25's inverse document frequency (the Lucene form, never negative)."""
    return math.log(1 + (documents - frequency + 0.5) / (frequency + 0.5))


def candidate_lexemes(frequencies: Mapping[str, int], cap: int) -> list[str]:
    """The query lexemes whose documents are scored: rarest first while their frequencies sum to at most cap.

    A lexeme only the query itself holds (frequency <= 1) finds nothing and
    is skipped. A query whose rarest usable lexeme is already held by more
    than cap documents has no candidates (its keyword side is empty and
    similar tickets rest on the vectors). Ties go by the lexeme, so
    evaluation and search choose the same ones.
    """
    chosen: list[str] = []
    total = 0
    for lexeme, frequency in sorted(frequencies.items(), key=lambda kv: (kv[1], kv[0])):
        if frequency <= 1:
            continue
        if total + frequency > cap:
            break
        chosen.append(lexeme)
        total += frequency
    return chosen


def query_terms(tsvector_text: str) -> dict[str, float]:
    """The query ticket's lexemes and their query weights."""
    return {lexeme: query_weight(title) for lexeme, (title, _) in field_counts(tsvector_text).items()}


def refresh_statistics(*, dataset_id: int, version: int | None = None) -> None:
    """Rewrite a dataset's lexeme frequencies and BM25 totals, and its documents' lengths, in SQL.

    Called in the transaction that writes the documents (an import, a
    refresh of search vectors), so the statistics always match them; ~0.5 s
    for 20k tickets. `version`: only the documents that version added or
    changed get their length recomputed (None: all). The dataset id is our
    own integer: ts_stat takes its query as text.
    """
    from django.db import connection

    dataset_id = int(dataset_id)
    with connection.cursor() as cursor:
        only = " AND d.changed_in_version = %s" if version is not None else ""
        cursor.execute(f"UPDATE training_document d SET bm25_length = ({DOCUMENT_LENGTH_SQL}) "
                       f"WHERE d.dataset_id = %s{only}", [dataset_id, *([version] if version is not None else [])])
        cursor.execute("DELETE FROM training_lexemefrequency WHERE dataset_id = %s", [dataset_id])
        cursor.execute(
            "INSERT INTO training_lexemefrequency (dataset_id, lexeme, documents) SELECT %s, word, ndoc FROM "
            f"ts_stat('SELECT search_vector FROM training_document WHERE dataset_id = {dataset_id} "
            "AND search_vector IS NOT NULL')",
            [dataset_id],
        )
        cursor.execute(
            "UPDATE training_dataset SET bm25_documents = s.documents, bm25_average_length = s.length FROM ("
            "SELECT count(*) AS documents, coalesce(avg(bm25_length), 0) AS length "
            "FROM training_document WHERE dataset_id = %s) s WHERE training_dataset.id = %s",
            [dataset_id, dataset_id],
        )
