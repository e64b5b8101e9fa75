"""The keyword side of search: PostgreSQL full text, the identifier side index, relaxing, snippets.

All values are bound parameters; only our own SQL fragments are formatted in.
"""

from __future__ import annotations

import re
from itertools import combinations

from django.conf import settings
from django.db import connection, connections
from django.db.models.expressions import RawSQL
from django.utils.html import escape

from embedportal import db_router
from search.filters import SearchFilters
from training import bm25
from training.models import Dataset, Document, LexemeFrequency

# The identifier side index (migration search 0003): this expression must stay
# byte-for-byte the one indexed there, or PostgreSQL falls back to a scan.
_TRANSLATE_ARGS = "'./\\:;,=()[]{}<>\"''$#@!?*|+', '                          '"
IDENTIFIER_TSVECTOR = "to_tsvector('simple'::regconfig, translate(d.title || ' ' || d.body, " + _TRANSLATE_ARGS + "))"
# A query goes to the side index too when it holds an identifier: a token
# that mixes letters and digits (HDFS-1234, s3a), has an inner capital
# (NullPointerException, FSNamesystem) or glues words with . / : $ #
# (dfs.replication, o.a.h.FSNamesystem).
_TOKEN = re.compile(r"[\w.\-/:$#]+")
_IDENTIFIER = re.compile(r"(?=.*[A-Za-z])(?=.*\d)|[a-z][A-Z]|[A-Z]{2,}[a-z]|[A-Za-z0-9][./:$#][A-Za-z0-9]")
# ts_headline markers: control characters no ticket text contains, turned into
# <mark> after HTML-escaping, so document text can never inject markup.
_MARK_START, _MARK_STOP = "\x02", "\x03"
HEADLINE_OPTIONS = f"MaxFragments=2, MaxWords=28, MinWords=10, FragmentDelimiter=\" … \", StartSel={_MARK_START}, StopSel={_MARK_STOP}"
# ts_headline re-parses the text, its cost grows with length: the first 4,000
# characters hold the description's gist and keep 10 snippets at ~2-4 ms.
HEADLINE_CHARS = 4000
# Fused results can be paged this deep (each side then fetches this many candidates).

def query_identifiers(query: str) -> list[str]:
    """The identifier-like tokens of a query (shown to people; the SQL splits them itself)."""
    return [t for t in (tok.strip(".-/:$#") for tok in _TOKEN.findall(query)) if t and _IDENTIFIER.search(t)]


# A whole query that is one ticket key (HDFS-6602) or one numeric id (a CSV export's "Issue id").
_KEY_QUERY = re.compile(r"^(?:[A-Za-z][A-Za-z0-9_]*-\d+|\d+)$")


def key_document(dataset: Dataset, query: str) -> int | None:
    """The id of the dataset's document whose key the whole query is (case-insensitive), or None.

    Keys are stored as Jira writes them (upper case); one indexed lookup on (dataset, key).
    """
    text = (query or "").strip()
    if not _KEY_QUERY.match(text):
        return None
    return Document.objects.filter(dataset=dataset, external_key__in={text, text.upper()}).values_list(
        "pk", flat=True).first()


# Matches are found through the GIN index and at most settings.KEYWORD_RANK_CAP of them are ranked (the
# inner LIMIT; NULL ranks every match): ts_rank_cd has no index order and reads each match's tsvector, so a
# common word's ~300k matches at a million tickets took seconds. A query matching fewer is ranked exactly.
_KEYWORD_SQL = (
    "SELECT s.id, ts_rank_cd(s.sv, s.tq) AS rank FROM ("
    "SELECT d.id, d.search_vector AS sv, q.tq FROM training_document d, (SELECT {tsquery} AS tq) q "
    "WHERE d.dataset_id = %s AND q.tq IS NOT NULL AND d.search_vector @@ q.tq{filters} LIMIT %s"
    ") s ORDER BY rank DESC, s.id LIMIT %s"
)
_ALL_WORDS = "websearch_to_tsquery(%s::regconfig, %s)"
# "Any word": the query's own lexemes OR-ed.
_ANY_WORD = (
    "(SELECT to_tsquery(%s::regconfig, string_agg(quote_literal(lexeme), ' | ')) "
    "FROM unnest(to_tsvector(%s::regconfig, %s)))"
)


def _identifier_sql(filters_sql: str) -> str:
    """Documents holding every word of the query in the side index, ranked by their any-word rank.

    Concatenated, not str.format()-ed: the expression holds braces.
    """
    return (
        "SELECT s.id, ts_rank_cd(s.sv, " + _ANY_WORD + ") AS rank FROM ("
        "SELECT d.id, d.search_vector AS sv FROM training_document d WHERE d.dataset_id = %s AND "
        + IDENTIFIER_TSVECTOR + " @@ websearch_to_tsquery('simple'::regconfig, translate(%s, " + _TRANSLATE_ARGS
        + "))" + filters_sql + " LIMIT %s) s ORDER BY rank DESC, s.id LIMIT %s"
    )


# Relaxing "all words": documents with all but 1, then all but 2 of the
# query's lexemes (Elasticsearch's minimum_should_match), written as an OR of
# AND-groups so each group stays selective and the GIN index does the work.
# Up to 12 lexemes (66 groups when dropping 2); at least 2 must remain.
MAX_RELAXED_LEXEMES = 12
MAX_DROPPED_WORDS = 2
# Last resort in keyword mode: any word, ranking only the first 500 matches
# found. Ranking every document that shares one common word with the query
# read and ranked ~30k tsvectors at 100k tickets: 0.5-1.7 s per query.
ANY_WORD_CAP = 500

_ANY_WORD_CAPPED_SQL = (
    "SELECT s.id, ts_rank_cd(s.sv, %s::tsquery) AS rank FROM ("
    "SELECT d.id, d.search_vector AS sv FROM training_document d "
    "WHERE d.dataset_id = %s AND d.search_vector @@ %s::tsquery{filters} LIMIT %s"
    ") s ORDER BY rank DESC, s.id LIMIT %s"
)


def _tsquery_literal(groups) -> str:
    """tsquery text OR-ing AND-groups of lexemes, each quoted (bound as a parameter, cast ::tsquery)."""

    def quoted(lexeme: str) -> str:
        return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"

    return " | ".join("(" + " & ".join(quoted(lexeme) for lexeme in group) + ")" for group in groups)


def keyword_ranking(
    dataset: Dataset, query: str, limit: int, filters: SearchFilters, *, any_word: bool = True
) -> tuple[list[tuple[int, float]], set[int], str]:
    """(ranking, ids matched through the identifier index, notice when the query was relaxed).

    Full text (all words, the dataset's language) and, when the query holds
    identifiers, the side index (all words too, unstemmed, identifiers split
    at their punctuation) are merged: a document found by either matches
    every word of the query. Documents only the side index finds are ranked
    by their any-word rank. When nothing has all the words the query is
    relaxed to all but 1, then all but 2 words, then (if `any_word`) any
    word among the first ANY_WORD_CAP matches. Each pass ranks at most
    settings.KEYWORD_RANK_CAP of its matches (found in index order), so a
    common word costs the cap, not the dataset's size. All values are bound
    parameters; only our own SQL fragments are formatted in.
    """
    config = dataset.language
    where, params = filters.sql()
    # Rank at most this many matches (None: all); never fewer than asked for.
    cap = max(settings.KEYWORD_RANK_CAP, limit) if settings.KEYWORD_RANK_CAP else None
    notice = ""
    with connections[db_router.search_alias()].cursor() as cursor:  # the read replica when one is configured
        by_identifier: list[tuple[int, float]] = []
        if query_identifiers(query):
            cursor.execute(_identifier_sql(where), [config, config, query, dataset.pk, query, *params, cap, limit])
            by_identifier = [(doc_id, float(rank)) for doc_id, rank in cursor.fetchall()]
        cursor.execute(
            _KEYWORD_SQL.format(tsquery=_ALL_WORDS, filters=where), [config, query, dataset.pk, *params, cap, limit]
        )
        rows = [(doc_id, float(rank)) for doc_id, rank in cursor.fetchall()]
        if not rows and not by_identifier:
            cursor.execute("SELECT lexeme FROM unnest(to_tsvector(%s::regconfig, %s))", [config, query])
            lexemes = [row[0] for row in cursor.fetchall()]
            for dropped in range(1, MAX_DROPPED_WORDS + 1):
                if len(lexemes) > MAX_RELAXED_LEXEMES or len(lexemes) - dropped < 2:
                    break
                tsquery = _tsquery_literal(combinations(lexemes, len(lexemes) - dropped))
                cursor.execute(
                    _KEYWORD_SQL.format(tsquery="%s::tsquery", filters=where),
                    [tsquery, dataset.pk, *params, cap, limit],
                )
                rows = [(doc_id, float(rank)) for doc_id, rank in cursor.fetchall()]
                if rows:
                    notice = (
                        f"No document has all the words; showing documents with all but {dropped} of them."
                    )
                    break
            if not rows and any_word and lexemes:
                tsquery = _tsquery_literal([lexeme] for lexeme in lexemes)
                cursor.execute(
                    _ANY_WORD_CAPPED_SQL.format(filters=where),
                    [tsquery, dataset.pk, tsquery, *params, ANY_WORD_CAP, limit],
                )
                rows = [(doc_id, float(rank)) for doc_id, rank in cursor.fetchall()]
                if rows:
                    notice = "No document has most of the words; showing documents with any of them."
    identifier_ids = {doc_id for doc_id, _ in by_identifier}
    scores = dict(by_identifier)
    scores.update(rows)  # the full-text rank wins where both found a document
    ranking = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return ranking[:limit], identifier_ids, notice


def snippet_annotation(dataset: Dataset, query: str) -> RawSQL:
    """ts_headline fragments of a document's body, as an expression to annotate a Document queryset with.

    Annotated onto the query that loads the hits, so documents and their
    snippets come in one round trip; marked_html() turns the text into HTML.
    """
    return RawSQL(
        "ts_headline(%s::regconfig, left(training_document.body, %s), websearch_to_tsquery(%s::regconfig, %s), %s)",
        [dataset.language, HEADLINE_CHARS, dataset.language, query, HEADLINE_OPTIONS],
    )


def marked_html(text: str) -> str:
    return (
        escape(" ".join(text.split()))
        .replace(_MARK_START, "<mark>")
        .replace(_MARK_STOP, "</mark>")
    )



# --- A ticket as the query (similar tickets): BM25, title weighted (training.bm25) ----------------------------

_TICKET_SQL = (
    "SELECT c.id, sum(q.weight * t.tf * {k1_plus_1}::float8 / (t.tf + {k1}::float8 * (1 - {b}::float8 + {b}::float8 * "
    "c.len / %s::float8))) AS score FROM ("
    "SELECT d.id, d.search_vector AS sv, d.bm25_length AS len FROM training_document d "
    "WHERE d.dataset_id = %s AND d.search_vector @@ %s::tsquery AND d.id <> %s{filters} LIMIT %s"
    ") c CROSS JOIN LATERAL (SELECT u.lexeme, {tf} AS tf FROM unnest(c.sv) u) t "
    "JOIN unnest(%s::text[], %s::float8[]) AS q(lexeme, weight) ON q.lexeme = t.lexeme "
    "GROUP BY c.id ORDER BY score DESC, c.id LIMIT %s"
)


def ticket_keyword_ranking(document: Document, limit: int, filters: SearchFilters) -> list[tuple[int, float]]:
    """The documents most like `document` by BM25 over their tsvectors (training.bm25), itself excluded.

    The ticket's lexemes weigh QUERY_TITLE_WEIGHT when in its title; the
    documents holding its rarest lexemes (up to settings.BM25_CANDIDATES,
    bm25.candidate_lexemes) are scored with the dataset's stored
    frequencies, in SQL. The same ranking as the held-out evaluation's
    keyword side (training.evaluation.bm25_scored_rankings).
    """
    dataset = document.dataset
    terms = bm25.query_terms(str(document.search_vector or ""))
    if not terms or not dataset.bm25_documents:
        return []
    frequencies = dict(
        LexemeFrequency.objects.filter(dataset=dataset, lexeme__in=list(terms)).values_list("lexeme", "documents")
    )
    chosen = bm25.candidate_lexemes(frequencies, settings.BM25_CANDIDATES)
    if not chosen:
        return []
    lexemes = sorted(frequencies)
    weights = [terms[lexeme] * bm25.idf(dataset.bm25_documents, frequencies[lexeme]) for lexeme in lexemes]
    where, params = filters.sql()
    sql = _TICKET_SQL.format(
        k1=bm25.K1, k1_plus_1=bm25.K1 + 1, b=bm25.B, tf=bm25.TF_SQL, filters=where,
    )
    with connections[db_router.search_alias()].cursor() as cursor:
        cursor.execute(sql, [
            max(dataset.bm25_average_length, 1e-6), dataset.pk, _tsquery_literal([lexeme] for lexeme in chosen),
            document.pk, *params, settings.BM25_CANDIDATES, lexemes, weights, limit,
        ])
        return [(doc_id, float(score)) for doc_id, score in cursor.fetchall()]
