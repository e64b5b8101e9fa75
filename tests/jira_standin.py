"""A small local Jira: real HTTP, real Jira response pages, for the connector's tests and `bench retrain`.

The one boundary we cannot reach from here is a Jira site, so this stands in
for it, and nothing else is faked: the connector talks HTTP to it exactly as
it would to Atlassian. It serves a list of issues in the shape of the REST
API (the shared Hadoop JSON is already in that shape) with:

- **Jira Cloud** (`flavor="cloud"`): `GET /rest/api/3/search/jql` paged by an
  opaque `nextPageToken` (`isLast` on the last page), descriptions in
  Atlassian Document Format, e-mail + API token as basic auth; the removed
  `/rest/api/3/search` and `/rest/api/2/search` answer 410 Gone as Cloud does
  since 2025.
- **Jira Data Center** (`flavor="data_center"`): `GET /rest/api/2/search` paged by
  `startAt` with `total`, plain-text descriptions, a personal access token as
  bearer.
- `GET /rest/api/{2,3}/myself` with the user's time zone (JQL dates are read in it).
- 401 for wrong credentials, 403 for a token in `forbidden_tokens`, 400 with
  Jira's `errorMessages` for JQL it cannot parse or a field it does not know.
- Faults on chosen pages: `faults={2: [429], 4: [500, 503]}` answers the first
  requests of page 2 (0-based, counted per query) with 429 + `Retry-After`, and
  of page 4 with 500 then 503, before serving the page; `served_faults` lists them.
- `before_page(page)`: called (in the server's thread) before a search page is
  served, e.g. to stop a sync halfway as a crash would.

The JQL understood is the subset a sync sends: `field op value` clauses
(`project`, `key`, `issuetype`, `status`, `created`, `updated`; `=`, `!=`,
`in`, `not in`, `>=`, `>`, `<=`, `<`) joined by AND / OR with parentheses,
and `ORDER BY key|created|updated ASC|DESC`. Dates as Jira writes them in JQL:
"yyyy/MM/dd HH:mm", "yyyy-MM-dd HH:mm", "yyyy/MM/dd", "yyyy-MM-dd".
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

CLOUD = "cloud"
DATA_CENTER = "data_center"
# Jira Cloud answers at most 100 issues per page of /search/jql with all fields; Data Center's default cap is 1000.
DEFAULT_PAGE_CAP = 100
FIELDS = ("summary", "description", "issuetype", "priority", "status", "resolution", "components", "labels",
          "created", "updated", "issuelinks")


class JQLError(ValueError):
    """Jira's 400: its message goes to errorMessages."""


# --- JQL -----------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>!=|>=|<=|=|>|<|~)|(?P<punct>[(),])|(?P<word>[^\s(),=!<>~"]+))')
_DATE_FORMATS = ("%Y/%m/%d %H:%M", "%Y-%m-%d %H:%M", "%Y/%m/%d", "%Y-%m-%d")
_FIELD_ALIASES = {"project": "project", "key": "key", "issuekey": "key", "issuetype": "issuetype", "type": "issuetype",
                  "status": "status", "created": "created", "createddate": "created", "updated": "updated",
                  "updateddate": "updated"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise JQLError(f"Error in the JQL Query: The character '{text[pos:].strip()[:1]}' is a reserved JQL "
                           f"character. You must enclose it in a string or use the escape '\\u{ord(text[pos]):04x}' "
                           f"instead. (line 1, character {pos + 1})")
        kind = match.lastgroup
        value = match.group(kind)
        out.append((kind, json.loads(value) if kind == "str" else value))
        pos = match.end()
    return out


class _Parser:
    """JQL subset -> a predicate over issues; ORDER BY -> sort keys."""

    def __init__(self, jql: str, tz: ZoneInfo):
        self.tz = tz
        body, order = _split_order(jql)
        self.order = _order_keys(order)
        self.items = _tokens(body)
        self.pos = 0
        self.predicate = (lambda issue: True) if not self.items else self._expr()
        if self.pos != len(self.items):
            raise JQLError(f"Error in the JQL Query: Expecting either 'OR' or 'AND' but got "
                           f"'{self.items[self.pos][1]}'.")

    def _peek(self) -> tuple[str, str] | None:
        return self.items[self.pos] if self.pos < len(self.items) else None

    def _take(self) -> tuple[str, str]:
        item = self._peek()
        if item is None:
            raise JQLError("Error in the JQL Query: The JQL query ends too early.")
        self.pos += 1
        return item

    def _word(self, word: str) -> bool:
        item = self._peek()
        if item and item[0] == "word" and item[1].lower() == word:
            self.pos += 1
            return True
        return False

    def _expr(self):
        left = self._term()
        while self._word("or"):
            right, first = self._term(), left
            left = lambda issue, a=first, b=right: a(issue) or b(issue)  # noqa: E731
        return left

    def _term(self):
        left = self._factor()
        while self._word("and"):
            right, first = self._factor(), left
            left = lambda issue, a=first, b=right: a(issue) and b(issue)  # noqa: E731
        return left

    def _factor(self):
        if self._peek() == ("punct", "("):
            self._take()
            inner = self._expr()
            if self._take() != ("punct", ")"):
                raise JQLError("Error in the JQL Query: Expecting ')' before the end of the query.")
            return inner
        return self._clause()

    def _clause(self):
        kind, name = self._take()
        if kind not in ("word", "str"):
            raise JQLError(f"Error in the JQL Query: Expecting a field name but got '{name}'.")
        field = _FIELD_ALIASES.get(name.lower())
        if field is None:
            raise JQLError(f"Field '{name}' does not exist or you do not have permission to view it.")
        if self._word("in"):
            values, negate = self._values(), False
        elif self._word("not"):
            if not self._word("in"):
                raise JQLError("Error in the JQL Query: Expecting 'IN' after 'NOT'.")
            values, negate = self._values(), True
        else:
            op_kind, op = self._take()
            if op_kind != "op" or op == "~":
                raise JQLError(f"Error in the JQL Query: Expecting operator but got '{op}'.")
            value_kind, value = self._take()
            if value_kind not in ("word", "str"):
                raise JQLError(f"Error in the JQL Query: Expecting a value but got '{value}'.")
            if field in ("created", "updated"):
                return self._date_clause(field, op, value)
            if op not in ("=", "!="):
                raise JQLError(f"The operator '{op}' is not supported by the '{name}' field.")
            values, negate = [value], op == "!="
        if field in ("created", "updated"):
            raise JQLError(f"The operator 'in' is not supported by the '{name}' field.")
        wanted = {v.lower() for v in values}
        return lambda issue: (_field_text(issue, field).lower() in wanted) != negate

    def _values(self) -> list[str]:
        if self._take() != ("punct", "("):
            raise JQLError("Error in the JQL Query: Expecting '(' after 'IN'.")
        values = []
        while True:
            kind, value = self._take()
            if kind not in ("word", "str"):
                raise JQLError(f"Error in the JQL Query: Expecting a value but got '{value}'.")
            values.append(value)
            sep = self._take()
            if sep == ("punct", ")"):
                return values
            if sep != ("punct", ","):
                raise JQLError("Error in the JQL Query: Expecting ',' or ')'.")

    def _date_clause(self, field: str, op: str, value: str):
        for fmt in _DATE_FORMATS:
            try:
                moment = datetime.strptime(value, fmt).replace(tzinfo=self.tz)
                break
            except ValueError:
                continue
        else:
            raise JQLError(f"Date value '{value}' for field '{field}' is invalid. Valid formats include: "
                           "'yyyy/MM/dd HH:mm', 'yyyy-MM-dd HH:mm', 'yyyy/MM/dd', 'yyyy-MM-dd'.")
        compare = {"=": lambda a: a == moment, "!=": lambda a: a != moment, ">=": lambda a: a >= moment,
                   ">": lambda a: a > moment, "<=": lambda a: a <= moment, "<": lambda a: a < moment}[op]
        return lambda issue: compare(jira_time(issue["fields"][field]))


def _split_order(jql: str) -> tuple[str, str]:
    match = re.search(r"\border\s+by\b", jql, flags=re.IGNORECASE)
    return (jql[: match.start()], jql[match.end():]) if match else (jql, "")


def _order_keys(order: str) -> list[tuple[str, bool]]:
    keys = []
    for part in (p.strip() for p in order.split(",") if p.strip()):
        words = part.split()
        field = _FIELD_ALIASES.get(words[0].lower())
        if field not in ("key", "created", "updated") or len(words) > 2:
            raise JQLError(f"Error in the JQL Query: Not able to sort using field '{words[0]}'.")
        descending = len(words) == 2 and words[1].lower() == "desc"
        keys.append((field, descending))
    return keys


def _field_text(issue: dict, field: str) -> str:
    if field == "key":
        return issue["key"]
    if field == "project":
        return issue["key"].rsplit("-", 1)[0]
    value = issue["fields"].get(field)
    return str(value.get("name", "")) if isinstance(value, dict) else str(value or "")


def jira_time(text: str) -> datetime:
    """Jira's timestamp ("2013-07-24T18:20:41.000+0000") as an aware datetime."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


def _sort_value(issue: dict, field: str):
    if field == "key":
        project, _, number = issue["key"].rpartition("-")
        return (project, int(number) if number.isdigit() else 0)
    return jira_time(issue["fields"][field])


def select(issues: list[dict], jql: str, tz: ZoneInfo) -> list[dict]:
    """The issues matching `jql`, in its ORDER BY (key order when it has none)."""
    parser = _Parser(jql, tz)
    chosen = [issue for issue in issues if parser.predicate(issue)]
    for field, descending in reversed(parser.order or [("key", False)]):
        chosen.sort(key=lambda issue: _sort_value(issue, field), reverse=descending)
    return chosen


# --- Response shapes ------------------------------------------------------------------------


def adf(text: str) -> dict:
    """Plain text as an Atlassian Document Format document (one paragraph per line), as Cloud's v3 returns."""
    return {"type": "doc", "version": 1, "content": [
        {"type": "paragraph", "content": [{"type": "text", "text": line}] if line else []}
        for line in text.split("\n")
    ]}


def _shaped(issue: dict, fields: list[str] | None, *, cloud: bool, base_url: str) -> dict:
    wanted = fields or list(FIELDS)
    out_fields = {name: issue["fields"].get(name) for name in wanted if name in issue["fields"]}
    if cloud and isinstance(out_fields.get("description"), str):
        out_fields["description"] = adf(out_fields["description"])
    number = re.sub(r"\D", "", issue["key"]) or "0"
    api = "3" if cloud else "2"
    return {"id": number, "key": issue["key"], "self": f"{base_url}/rest/api/{api}/issue/{number}",
            "fields": out_fields}


# --- The server -----------------------------------------------------------------------------


class JiraStandIn:
    """A Jira site on 127.0.0.1 in a thread. Use as a context manager, or start()/stop()."""

    def __init__(
        self, issues: list[dict] | None = None, *, flavor: str = CLOUD, email: str = "bot@example.com",
        token: str = "jira-api-token", time_zone: str = "UTC", page_cap: int = DEFAULT_PAGE_CAP,
        faults: dict[int, list[int]] | None = None, retry_after_s: int = 1, forbidden_tokens: tuple[str, ...] = (),
    ):
        self.flavor = flavor
        self.email = email
        self.token = token
        self.time_zone = time_zone
        self.page_cap = page_cap
        self.faults = {page: list(statuses) for page, statuses in (faults or {}).items()}
        self.retry_after_s = retry_after_s
        self.forbidden_tokens = set(forbidden_tokens)
        self.requests: list[dict[str, Any]] = []
        self.before_page: Callable[[int], None] | None = None
        self.served_faults: list[tuple[int, int]] = []
        self._issues = list(issues or [])
        self.port = 0  # 0: any free port
        self._fault_counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control --

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_issues(self, issues: list[dict]) -> None:
        """Replace what the site holds (the benchmark moves its day forward with this)."""
        with self._lock:
            self._issues = list(issues)

    def search_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if "/search" in r["path"]]

    def start(self) -> "JiraStandIn":
        standin = self

        class Handler(_Handler):
            site = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="jira-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "JiraStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- behaviour --

    def authenticate(self, header: str) -> int:
        """200, 401 (who are you?) or 403 (known, but not allowed)."""
        if self.flavor == CLOUD:
            if not header.startswith("Basic "):
                return 401
            try:
                email, _, token = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return 401
            if token in self.forbidden_tokens:
                return 403
            return 200 if (email, token) == (self.email, self.token) else 401
        if not header.startswith("Bearer "):
            return 401
        token = header[7:]
        if token in self.forbidden_tokens:
            return 403
        return 200 if token == self.token else 401

    def fault_for(self, jql: str, page: int) -> int | None:
        """The status to answer instead of this page, if a fault is still due for it."""
        statuses = self.faults.get(page)
        if not statuses:
            return None
        with self._lock:
            seen = self._fault_counts.get((jql, page), 0)
            if seen >= len(statuses):
                return None
            self._fault_counts[(jql, page)] = seen + 1
            self.served_faults.append((page, statuses[seen]))
            return statuses[seen]

    def matching(self, jql: str) -> list[dict]:
        with self._lock:
            issues = list(self._issues)
        return select(issues, jql, ZoneInfo(self.time_zone))


def _page_token(offset: int, jql: str) -> str:
    raw = json.dumps({"o": offset, "q": hashlib.sha1(jql.encode()).hexdigest()[:10]}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_token(token: str, jql: str) -> int | None:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if data["q"] != hashlib.sha1(jql.encode()).hexdigest()[:10]:
            return None
        return int(data["o"])
    except (ValueError, KeyError, TypeError):
        return None


class _Handler(BaseHTTPRequestHandler):
    site: JiraStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # quiet: tests read site.requests instead
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        site = self.site
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        record = {"path": url.path, "params": params, "status": None, "at": time.monotonic(),
                  "authorization": self.headers.get("Authorization", "")}
        site.requests.append(record)
        status, body, headers = self._answer(url.path, params)
        record["status"] = status
        self._send(status, body, headers)

    def _answer(self, path: str, params: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        site = self.site
        cloud = site.flavor == CLOUD
        search_path = "/rest/api/3/search/jql" if cloud else "/rest/api/2/search"
        known = {search_path, "/rest/api/2/myself", "/rest/api/3/myself", "/rest/api/3/search", "/rest/api/2/search",
                 "/rest/api/3/search/jql"}
        if path not in known:
            return 404, {"errorMessages": ["Null for uri: " + path]}, {}
        auth = site.authenticate(self.headers.get("Authorization", ""))
        if auth == 401:
            return 401, {"errorMessages": ["You are not authenticated. Authentication required to perform this "
                                           "operation."]}, {"WWW-Authenticate": 'Basic realm="protected-area"'}
        if auth == 403:
            return 403, {"errorMessages": ["You do not have permission to browse issues in this project."]}, {}
        if path.endswith("/myself"):
            who = {"displayName": "Sync Bot", "timeZone": site.time_zone, "active": True}
            who.update({"accountId": "5b10ac8d82e05b22cc7d4ef5", "emailAddress": site.email} if cloud
                       else {"name": "syncbot", "key": "syncbot"})
            return 200, who, {}
        if path != search_path:
            if cloud and path in ("/rest/api/3/search", "/rest/api/2/search"):
                return 410, {"errorMessages": ["The requested API has been removed. Please migrate to the "
                                               "/rest/api/3/search/jql API."]}, {}
            return 404, {"errorMessages": ["Null for uri: " + path]}, {}
        jql = params.get("jql", "")
        try:
            chosen = site.matching(jql)
        except JQLError as exc:
            return 400, {"errorMessages": [str(exc)], "errors": {}}, {}
        try:
            size = max(1, min(int(params.get("maxResults") or 50), site.page_cap))
        except ValueError:
            return 400, {"errorMessages": ["maxResults must be a number"], "errors": {}}, {}
        if cloud:
            token = params.get("nextPageToken")
            offset = 0 if not token else _read_token(token, jql)
            if offset is None:
                return 400, {"errorMessages": ["The provided next page token is invalid or expired."],
                             "errors": {}}, {}
        else:
            try:
                offset = max(0, int(params.get("startAt") or 0))
            except ValueError:
                return 400, {"errorMessages": ["startAt must be a number"], "errors": {}}, {}
        fault = site.fault_for(jql, offset // size)
        if fault == 429:
            return 429, {"errorMessages": ["Rate limit exceeded."]}, {"Retry-After": str(site.retry_after_s)}
        if fault is not None:
            return fault, {"errorMessages": ["Internal server error"]}, {}
        if site.before_page is not None:
            site.before_page(offset // size)
        fields = [f for f in params.get("fields", "").split(",") if f and f not in ("*all", "*navigable")] or None
        page = [_shaped(issue, fields, cloud=cloud, base_url=site.base_url) for issue in chosen[offset:offset + size]]
        if cloud:
            body: dict[str, Any] = {"issues": page, "isLast": offset + size >= len(chosen)}
            if not body["isLast"]:
                body["nextPageToken"] = _page_token(offset + size, jql)
            return 200, body, {}
        return 200, {"startAt": offset, "maxResults": size, "total": len(chosen), "issues": page}, {}


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.jira_standin`: serve a Jira export on a port until Ctrl-C (to try the connector by hand)."""
    import argparse
    import gzip
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m tests.jira_standin")
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "jira"
                        / "apache-hadoop.jira.json.gz")
    parser.add_argument("--limit", type=int, default=0, help="serve only the issues created first (0: all)")
    parser.add_argument("--flavor", choices=(CLOUD, DATA_CENTER), default=DATA_CENTER)
    parser.add_argument("--email", default="bot@example.com")
    parser.add_argument("--token", default="jira-api-token")
    parser.add_argument("--port", type=int, default=8031)
    args = parser.parse_args(argv)
    with gzip.open(args.data, "rt") if args.data.suffix == ".gz" else open(args.data) as fh:
        issues = json.load(fh)["issues"]
    issues = sorted(issues, key=lambda i: i["fields"]["created"])[: args.limit or None]
    for issue in issues:  # as Jira held them when created: a larger --limit later brings newer issues
        issue["fields"]["updated"] = issue["fields"]["created"]
    site = JiraStandIn(issues, flavor=args.flavor, email=args.email, token=args.token)
    site.port = args.port
    site.start()
    print(f"Jira stand-in ({args.flavor}, {len(issues)} issues) at {site.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        site.stop()


if __name__ == "__main__":
    main()
