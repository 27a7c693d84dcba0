#!/usr/bin/env python3
"""Derive the DynamoDB table definitions from terraform/*.tf.

Prints the same JSON shape as the code's `cargo run -q -p projector -- tables --json`:

    [{"name_suffix": "events",
      "hash_key": ["stream_id", "S"], "range_key": ["version", "N"],
      "stream": "NEW_IMAGE",
      "gsis": [{"name": "by-time", "hash_key": ["time_bucket", "S"],
                "range_key": ["occurred_key", "S"]}]},
     ...]

sorted deterministically (tables by name_suffix, GSIs by name), so that
scripts/check_terraform.py can compare it with the code's definition.

It reads every `aws_dynamodb_table` resource statically with python-hcl2, so
the table names must be written as "${var.table_prefix}-<suffix>" and the keys
as literals. It also rejects a table that terraform or DynamoDB itself would
reject (a key without an attribute definition, an attribute used by no key) and
any GSI whose projection is not ALL.

Usage: python3 scripts/terraform_tables.py [--dir terraform]
Needs: python-hcl2 (`pip install python-hcl2`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

NAME_RE = re.compile(r"^\$\{var\.table_prefix\}-([A-Za-z0-9_.-]+)$")


class TerraformTablesError(Exception):
    """The terraform table definitions are unreadable or inconsistent."""


def import_hcl2():
    try:
        import hcl2  # type: ignore
    except ImportError as exc:  # pragma: no cover - environment problem
        raise SystemExit(
            "python-hcl2 is not installed: pip install python-hcl2 "
            "(scripts/check-terraform.sh installs the pinned version)"
        ) from exc
    return hcl2


def unquote(value: Any) -> Any:
    """A scalar attribute value as a plain Python value.

    python-hcl2 >= 5 keeps the quotes of string literals and block labels;
    older versions and checkov's fork (bc-python-hcl2) wrap every attribute
    value in a one-element list. Both shapes are accepted, so the checks run
    with whichever `hcl2` module is installed.
    """
    if isinstance(value, list) and len(value) == 1 and not isinstance(value[0], dict):
        value = value[0]
    if isinstance(value, str) and len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def as_bool(value: Any) -> bool:
    value = unquote(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def tf_files(directory: Path) -> List[Path]:
    return sorted(
        p for p in directory.rglob("*.tf") if ".terraform" not in p.relative_to(directory).parts
    )


def parse_file(path: Path) -> Dict[str, Any]:
    hcl2 = import_hcl2()
    with path.open("r", encoding="utf-8") as handle:
        return hcl2.load(handle)


def iter_blocks(parsed: Dict[str, Any], kind: str) -> Iterable[Tuple[str, str, Dict[str, Any]]]:
    """Yield (type, name, body) for every `kind "type" "name" { ... }` block."""
    for entry in parsed.get(kind, []) or []:
        for rtype, named in entry.items():
            if rtype.startswith("__"):
                continue
            for rname, body in named.items():
                if rname.startswith("__"):
                    continue
                yield unquote(rtype), unquote(rname), body


def _blocks(body: Dict[str, Any], key: str) -> List[Dict[str, Any]]:
    value = body.get(key) or []
    if isinstance(value, dict):
        return [value]
    return list(value)


def table_from_resource(rname: str, body: Dict[str, Any], where: str) -> Dict[str, Any]:
    problems: List[str] = []
    raw_name = unquote(body.get("name"))
    match = NAME_RE.match(raw_name or "")
    if not match:
        raise TerraformTablesError(
            f"{where}: aws_dynamodb_table.{rname}: name must be the literal "
            f'"${{var.table_prefix}}-<suffix>", found {raw_name!r}'
        )
    suffix = match.group(1)

    attributes: Dict[str, str] = {}
    for attr in _blocks(body, "attribute"):
        attributes[unquote(attr.get("name"))] = unquote(attr.get("type"))

    used: set = set()

    def key(attr_name: Any, what: str) -> Optional[List[str]]:
        attr_name = unquote(attr_name)
        if attr_name in (None, ""):
            return None
        if not isinstance(attr_name, str) or attr_name.startswith("${"):
            problems.append(f"{what} must be a literal attribute name, found {attr_name!r}")
            return None
        used.add(attr_name)
        if attr_name not in attributes:
            problems.append(f"{what} {attr_name!r} has no attribute {{}} block")
            return [attr_name, "?"]
        return [attr_name, attributes[attr_name]]

    hash_key = key(body.get("hash_key"), "hash_key")
    if hash_key is None:
        problems.append("table has no hash_key")
    range_key = key(body.get("range_key"), "range_key")

    stream = None
    if as_bool(body.get("stream_enabled", False)):
        stream = unquote(body.get("stream_view_type"))
        if not stream:
            problems.append("stream_enabled without stream_view_type")

    gsis = []
    for gsi in _blocks(body, "global_secondary_index"):
        gname = unquote(gsi.get("name"))
        projection = unquote(gsi.get("projection_type"))
        if projection != "ALL":
            problems.append(f"GSI {gname!r}: projection_type must be ALL, found {projection!r}")
        hash_name, range_name = gsi.get("hash_key"), gsi.get("range_key")
        # AWS provider >= 6.x also accepts `key_schema` blocks (and deprecates
        # hash_key/range_key in GSIs); read either form.
        for part in _blocks(gsi, "key_schema"):
            key_type = unquote(part.get("key_type"))
            if key_type == "HASH":
                hash_name = part.get("attribute_name")
            elif key_type == "RANGE":
                range_name = part.get("attribute_name")
        gsis.append(
            {
                "name": gname,
                "hash_key": key(hash_name, f"GSI {gname!r} hash_key"),
                "range_key": key(range_name, f"GSI {gname!r} range_key"),
            }
        )
    if _blocks(body, "local_secondary_index"):
        problems.append("local secondary indexes are not part of the code's definition")

    unused = sorted(set(attributes) - used)
    if unused:
        problems.append(f"attribute blocks used by no key (terraform/DynamoDB reject these): {unused}")

    if problems:
        raise TerraformTablesError(
            f"{where}: aws_dynamodb_table.{rname}:\n  - " + "\n  - ".join(problems)
        )

    return {
        "name_suffix": suffix,
        "hash_key": hash_key,
        "range_key": range_key,
        "stream": stream,
        "gsis": sorted(gsis, key=lambda g: g["name"]),
    }


def load_tables(directory: Path) -> List[Dict[str, Any]]:
    """All aws_dynamodb_table resources under `directory`, in the code's JSON shape."""
    tables: Dict[str, Dict[str, Any]] = {}
    for path in tf_files(directory):
        parsed = parse_file(path)
        for rtype, rname, body in iter_blocks(parsed, "resource"):
            if rtype != "aws_dynamodb_table":
                continue
            table = table_from_resource(rname, body, str(path))
            if table["name_suffix"] in tables:
                raise TerraformTablesError(f"{path}: table suffix {table['name_suffix']!r} defined twice")
            tables[table["name_suffix"]] = table
    return [tables[k] for k in sorted(tables)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        default=str(Path(__file__).resolve().parent.parent / "terraform"),
        help="terraform directory (default: <repo>/terraform)",
    )
    args = parser.parse_args(argv)
    try:
        tables = load_tables(Path(args.dir))
    except TerraformTablesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    json.dump(tables, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
