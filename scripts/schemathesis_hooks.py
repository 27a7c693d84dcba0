"""Schemathesis hooks for scripts/schemathesis.sh: the request rules OpenAPI cannot state.

Everything else the server checks is in the document itself (patterns, lengths, enums, each
cursor parameter's listing name), so schemathesis judges those on its own. Two rules remain:

* `until` must not be before `since` (a rule across two parameters; the document says so in
  words and answers 400; equal is an empty window). A positive case that breaks it gets
  `until = since`, so it stays a valid request and the server must accept it; negative cases are
  sent as generated.
* The usage report's range: `to` after `from`, at most 400 days apart (`from` defaults to 7 days
  before `to`, `to` to now). A positive case that breaks it gets `from` one day before the
  effective `to` (or loses both times when that cannot be written), so it stays valid.
* A reservation (`POST /v1/admin/reservations`) is checked against the clock and the pool: the
  window must end after it opens and in the future, last at most 72 hours and open at most 90
  days ahead (the defaults of RESERVATION_MAX_WINDOW_HOURS and RESERVATION_MAX_AHEAD_DAYS), and
  some sandbox's name must start with `prefix`. The document states the shapes; these depend on
  the time of the run (the document's own example window is a fixed date) and on the pool. A
  positive case that breaks them gets a window from one to three hours from now and the demo
  pool's prefix, so it stays valid; negative cases are sent as generated. A refusal for capacity
  is a documented 409 and is left alone.
* A cursor is valid only if the server issued it, for the same listing with the same filters.
  The document's pattern names the listing, so a cursor of another listing is negative data by
  the document; but a generated string that fits the pattern is still not a position. Positive
  cases therefore keep a cursor only when a response of that listing, with the same other query
  parameters but `limit`, returned it (recorded by `after_call`); any other positive cursor is
  dropped. Negative cases keep theirs.
"""

from datetime import datetime, timedelta, timezone

import schemathesis

# Cursors the server returned: (path, the request's other query parameters) -> cursors.
_ISSUED: dict[tuple, set[str]] = {}


def _positive(case) -> bool:
    meta = getattr(case, "meta", None)
    generation = getattr(meta, "generation", None)
    mode = getattr(generation, "mode", None)
    return mode is None or bool(getattr(mode, "is_positive", True))


def _time(raw):
    if not isinstance(raw, str):
        return None
    # Read as the server reads it: exactly as sent (spaces around a time are a 400 there).
    if raw != raw.strip():
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _listing(case) -> tuple:
    query = case.query if isinstance(case.query, dict) else {}
    # `limit` does not bind a cursor; every other parameter may (the sandbox listing's filters).
    others = tuple(sorted((str(k), str(v)) for k, v in query.items() if k not in ("cursor", "limit")))
    return (case.path, others)


def _usage_range(query) -> None:
    """Keeps a positive usage request's range inside the server's rule (see the module doc)."""
    raw_from, raw_to = query.get("from"), query.get("to")
    if raw_from is None:
        return
    start = _time(raw_from)
    end = _time(raw_to) if raw_to is not None else datetime.now(timezone.utc)
    if start is None or end is None:
        query.pop("from", None)
        query.pop("to", None)
        return
    if start < end and end - start <= timedelta(days=400):
        return
    try:
        query["from"] = (end - timedelta(days=1)).isoformat()
    except OverflowError:
        query.pop("from", None)
        query.pop("to", None)


# A name of the demo pool the API seeds from the mock CSP (`lab-demo-001`, ...).
_DEMO_NAME = "lab-demo-001"
_MAX_WINDOW = timedelta(hours=72)
_MAX_AHEAD = timedelta(days=90)


def _reservation_body(body) -> None:
    """Keeps a positive reservation request inside the clock and pool rules (module doc)."""
    if not isinstance(body, dict):
        return
    prefix = body.get("prefix")
    if isinstance(prefix, str):
        # The server trims spaces; a blank prefix means none.
        wanted = prefix.strip(" ")
        if wanted and not _DEMO_NAME.startswith(wanted):
            body["prefix"] = "lab-demo-"
    now = datetime.now(timezone.utc)
    starts = _time(body.get("starts_at"))
    ends = _time(body.get("ends_at"))
    valid = (
        starts is not None
        and ends is not None
        and starts < ends
        # A margin of a minute for the time the request takes to arrive.
        and ends > now + timedelta(minutes=1)
        and ends - starts <= _MAX_WINDOW
        and starts - now <= _MAX_AHEAD - timedelta(minutes=1)
    )
    if not valid:
        body["starts_at"] = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body["ends_at"] = (now + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if not _positive(case):
        return
    if case.path == "/v1/admin/reservations" and case.method.upper() == "POST":
        _reservation_body(case.body)
    if not isinstance(case.query, dict):
        return
    query = case.query
    if "since" in query and "until" in query:
        since, until = _time(query["since"]), _time(query["until"])
        if since is None or until is None:
            # A time Python cannot read (a leap second, say) cannot be compared here: send the
            # case without `until`, which keeps it valid.
            del query["until"]
        elif until < since:
            query["until"] = query["since"]
    if case.path == "/v1/admin/usage":
        _usage_range(query)
    # Checked after the edit above, against the parameters as they will be sent.
    cursor = query.get("cursor")
    if cursor and cursor not in _ISSUED.get(_listing(case), ()):
        del query["cursor"]


@schemathesis.hook
def after_call(ctx, case, response):
    if response.status_code != 200:
        return
    try:
        body = response.json()
    except Exception:  # noqa: BLE001 - a body that is not JSON issues no cursor
        return
    cursor = body.get("cursor") if isinstance(body, dict) else None
    if isinstance(cursor, str) and cursor:
        _ISSUED.setdefault(_listing(case), set()).add(cursor)
