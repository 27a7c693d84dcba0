"""Schemathesis hooks for scripts/schemathesis.sh: the two request rules OpenAPI cannot state.

* `until` must be after `since` (a rule across two parameters; the document says so in words and
  answers 400). A positive case that breaks it is moved to `until = since + 1 s`, so it stays a
  valid request and the server must accept it; negative cases are sent as generated.
* `cursor` is opaque: only a value the server returned for the same listing is valid. Generated
  strings (and the stateful phase's guess that one listing's cursor fits another) are not valid
  data, so positive cases are sent without a cursor; negative cases keep theirs.
"""

from datetime import datetime, timedelta

import schemathesis


def _positive(case) -> bool:
    meta = getattr(case, "meta", None)
    generation = getattr(meta, "generation", None)
    mode = getattr(generation, "mode", None)
    return mode is None or bool(getattr(mode, "is_positive", True))


def _time(raw):
    if not isinstance(raw, str):
        return None
    try:
        parsed = datetime.fromisoformat(raw.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if not _positive(case) or not isinstance(case.query, dict):
        return
    query = case.query
    if query.get("cursor"):
        del query["cursor"]
    since, until = _time(query.get("since")), _time(query.get("until"))
    if since is not None and until is not None and until <= since:
        try:
            query["until"] = (since + timedelta(seconds=1)).isoformat()
        except OverflowError:
            del query["since"]
