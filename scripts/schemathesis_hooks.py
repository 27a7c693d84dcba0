"""Schemathesis hooks for scripts/schemathesis.sh: the two request rules OpenAPI cannot state.

* `until` must not be before `since` (a rule across two parameters; the document says so in
  words and answers 400; equal is an empty window). A positive case that breaks it gets
  `until = since`, so it stays a valid request and the server must accept it; negative cases are
  sent as generated.
* `cursor` is opaque: only a value the server returned for the same listing is valid. Generated
  strings (and the stateful phase's guess that one listing's cursor fits another) are not valid
  data, so positive cases are sent without a cursor; negative cases keep theirs.
"""

from datetime import datetime

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
    if "since" in query and "until" in query:
        since, until = _time(query["since"]), _time(query["until"])
        if since is None or until is None:
            # A time Python cannot read (a leap second, say) cannot be compared here: send the
            # case without `until`, which keeps it valid.
            del query["until"]
        elif until < since:
            query["until"] = query["since"]
