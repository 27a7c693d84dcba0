#!/usr/bin/env python3
"""Static checks of terraform/ that need no terraform binary (run in CI).

1. Every .tf file parses (python-hcl2); terraform.tfvars.example parses too and
   sets only declared variables.
2. References resolve: every var.X, local.X, data.T.N, ephemeral.T.N and
   resource T.N used in an expression is declared (the reference deployment
   shipped references to resources that did not exist), and every declared
   variable is used.
3. Every variable and output has a description.
4. No region is hard-coded in a .tf file (it comes from var.aws_region).
5. Every `checkov:skip=CKV_...` comment carries a reason.
6. The DynamoDB tables (scripts/terraform_tables.py) are consistent, and, for
   each --code-tables FILE given, equal to that JSON definition (the code's
   `cargo run -q -p projector -- tables --json`, or
   terraform/tables.expected.json). Differences are printed.

Exit status 0 when everything holds, 1 otherwise.

Usage:
  python3 scripts/check_terraform.py [--dir terraform] [--code-tables FILE ...]
  (FILE may be "-" for standard input)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import terraform_tables as tt  # noqa: E402

# Reference patterns, matched only inside expressions (strings containing "${",
# which is how python-hcl2 renders expressions and interpolations).
_NOT_AFTER = r"(?<![\w.\-])"
REF_PATTERNS = {
    "var": re.compile(_NOT_AFTER + r"var\.([A-Za-z_][\w-]*)"),
    "local": re.compile(_NOT_AFTER + r"local\.([A-Za-z_][\w-]*)"),
    "data": re.compile(_NOT_AFTER + r"data\.([a-z][\w]*)\.([A-Za-z_][\w-]*)"),
    "ephemeral": re.compile(_NOT_AFTER + r"ephemeral\.([a-z][\w]*)\.([A-Za-z_][\w-]*)"),
    "resource": re.compile(_NOT_AFTER + r"((?:aws|random|null|tls|archive|time)_[a-z0-9_]+)\.([A-Za-z_][\w-]*)"),
}

# A region code such as us-east-1, eu-central-2, ap-southeast-3, us-gov-west-1.
REGION_RE = re.compile(
    r"\b(?:us|eu|ap|sa|ca|me|af|il|mx|cn)(?:-gov|-iso[a-z]?)?-"
    r"(?:north|south|east|west|central|northeast|northwest|southeast|southwest)-\d\b"
)
PROSE_RE = re.compile(r"^\s*(description|error_message|alarm_description)\s*=")
SKIP_RE = re.compile(r"checkov:skip=([A-Z0-9_]+)(?::(.*))?")


class Report:
    def __init__(self) -> None:
        self.errors: List[str] = []

    def error(self, message: str) -> None:
        self.errors.append(message)
        print(f"FAIL: {message}")

    def ok(self, message: str) -> None:
        print(f"ok:   {message}")


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def parse_all(directory: Path, report: Report) -> List[Tuple[Path, Dict[str, Any]]]:
    files = tt.tf_files(directory)
    if not files:
        report.error(f"no .tf files under {directory}")
        return []
    hcl2 = tt.import_hcl2()
    print(f"note: parsing with hcl2 {getattr(hcl2, '__version__', '(version unknown)')} from {Path(hcl2.__file__).parent}")
    parsed = []
    for path in files:
        try:
            parsed.append((path, tt.parse_file(path)))
        except Exception as exc:  # python-hcl2 raises lark exceptions of many kinds
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            report.error(f"{path}: does not parse: {first_line}")
    if len(parsed) == len(files):
        report.ok(f"{len(files)} .tf files parse")
    return parsed


# ---------------------------------------------------------------------------
# Declarations and references
# ---------------------------------------------------------------------------


def walk_strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.startswith("__"):
                continue  # __comments__, __is_block__, ...
            if isinstance(key, str) and "${" in key:
                yield key
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)


def declarations(parsed: List[Tuple[Path, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    decl: Dict[str, Dict[str, Any]] = {
        "var": {},
        "local": {},
        "data": {},
        "ephemeral": {},
        "resource": {},
        "output": {},
    }
    for path, doc in parsed:
        for entry in doc.get("variable", []) or []:
            for name, body in entry.items():
                decl["var"][tt.unquote(name)] = (path, body)
        for entry in doc.get("output", []) or []:
            for name, body in entry.items():
                decl["output"][tt.unquote(name)] = (path, body)
        for entry in doc.get("locals", []) or []:
            for name in entry:
                if not name.startswith("__"):
                    decl["local"][name] = (path, entry[name])
        for kind in ("resource", "data", "ephemeral"):
            for rtype, rname, body in tt.iter_blocks(doc, kind):
                decl[kind][f"{rtype}.{rname}"] = (path, body)
    return decl


def check_references(parsed: List[Tuple[Path, Dict[str, Any]]], report: Report) -> None:
    decl = declarations(parsed)
    used_vars: Set[str] = set()
    used_locals: Set[str] = set()
    missing: List[str] = []
    for path, doc in parsed:
        # A variable's own validation block does not count as a use of it.
        body = {k: v for k, v in doc.items() if k != "variable"}
        for text in walk_strings(body):
            if "${" not in text:
                continue
            for name in REF_PATTERNS["var"].findall(text):
                used_vars.add(name)
                if name not in decl["var"]:
                    missing.append(f"{path.name}: var.{name}")
            for name in REF_PATTERNS["local"].findall(text):
                used_locals.add(name)
                if name not in decl["local"]:
                    missing.append(f"{path.name}: local.{name}")
            for kind in ("data", "ephemeral", "resource"):
                for rtype, rname in REF_PATTERNS[kind].findall(text):
                    if f"{rtype}.{rname}" not in decl[kind]:
                        prefix = "" if kind == "resource" else f"{kind}."
                        missing.append(f"{path.name}: {prefix}{rtype}.{rname}")
    if missing:
        for item in sorted(set(missing)):
            report.error(f"reference to an undeclared object: {item}")
    else:
        report.ok("every var/local/data/ephemeral/resource reference is declared")

    unused = sorted(set(decl["var"]) - used_vars)
    if unused:
        report.error(f"variables declared but never used: {unused}")
    else:
        report.ok(f"all {len(decl['var'])} variables are used")

    undocumented = sorted(
        f"{kind} {name}"
        for kind in ("var", "output")
        for name, (_, body) in decl[kind].items()
        if not str(tt.unquote(body.get("description", "")) or "").strip()
    )
    if undocumented:
        report.error(f"missing description: {undocumented}")
    else:
        report.ok(f"all variables and {len(decl['output'])} outputs have descriptions")

    unused_locals = sorted(set(decl["local"]) - used_locals)
    if unused_locals:
        print(f"note: locals never referenced: {unused_locals}")


def check_tfvars_example(directory: Path, parsed: List[Tuple[Path, Dict[str, Any]]], report: Report) -> None:
    example = directory / "terraform.tfvars.example"
    if not example.exists():
        report.error(f"{example} is missing")
        return
    try:
        values = tt.parse_file(example)
    except Exception as exc:
        report.error(f"{example}: does not parse: {str(exc).strip().splitlines()[0]}")
        return
    declared = declarations(parsed)["var"]
    unknown = sorted(k for k in values if not k.startswith("__") and k not in declared)
    if unknown:
        report.error(f"{example.name} sets undeclared variables: {unknown}")
    else:
        report.ok(f"{example.name} parses and sets only declared variables")


# ---------------------------------------------------------------------------
# Text checks
# ---------------------------------------------------------------------------


def strip_comment(line: str) -> str:
    """Drop a trailing # or // comment (good enough for region detection)."""
    in_string = False
    for i, ch in enumerate(line):
        if ch == '"' and (i == 0 or line[i - 1] != "\\"):
            in_string = not in_string
        elif not in_string and (ch == "#" or line.startswith("//", i)):
            return line[:i]
    return line


def check_text(directory: Path, report: Report) -> None:
    region_hits: List[str] = []
    skip_problems: List[str] = []
    skips = 0
    for path in tt.tf_files(directory):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            # Prose (descriptions, error messages) may name a region as an example.
            is_prose = PROSE_RE.match(line) is not None
            if not is_prose and REGION_RE.search(strip_comment(line)):
                region_hits.append(f"{path.name}:{number}: {line.strip()}")
            for match in SKIP_RE.finditer(line):
                skips += 1
                reason = (match.group(2) or "").strip()
                if len(reason.split()) < 4:
                    skip_problems.append(f"{path.name}:{number}: {match.group(1)} needs a reason (`#checkov:skip=ID:why`)")
    if region_hits:
        for hit in region_hits:
            report.error(f"hard-coded region (use var.aws_region): {hit}")
    else:
        report.ok("no hard-coded region")
    if skip_problems:
        for problem in skip_problems:
            report.error(problem)
    else:
        report.ok(f"all {skips} checkov skips carry a reason")


# ---------------------------------------------------------------------------
# Tables: terraform vs. the code
# ---------------------------------------------------------------------------

KNOWN_TABLE_KEYS = {"name_suffix", "hash_key", "range_key", "stream", "gsis"}
KNOWN_GSI_KEYS = {"name", "hash_key", "range_key", "projection"}


def _norm_key(value: Any, where: str) -> Optional[Tuple[str, str]]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (str(value[0]), str(value[1]))
    if isinstance(value, dict):
        name = value.get("name", value.get("attribute_name"))
        kind = value.get("type", value.get("attribute_type"))
        if name is not None and kind is not None:
            return (str(name), str(kind))
    raise ValueError(f"{where}: cannot read key {value!r} (expected [name, type])")


def normalise(tables: Any, origin: str) -> Dict[str, Dict[str, Any]]:
    if isinstance(tables, dict) and "tables" in tables:
        tables = tables["tables"]
    if not isinstance(tables, list):
        raise ValueError(f"{origin}: expected a JSON list of tables")
    result: Dict[str, Dict[str, Any]] = {}
    for table in tables:
        suffix = table.get("name_suffix")
        if not suffix:
            raise ValueError(f"{origin}: table without name_suffix: {table!r}")
        extra = set(table) - KNOWN_TABLE_KEYS
        if extra:
            print(f"note: {origin}: table {suffix}: ignoring fields {sorted(extra)}")
        stream = table.get("stream") or None
        gsis: Dict[str, Dict[str, Any]] = {}
        for gsi in table.get("gsis") or []:
            extra = set(gsi) - KNOWN_GSI_KEYS
            if extra:
                print(f"note: {origin}: {suffix}/{gsi.get('name')}: ignoring fields {sorted(extra)}")
            gsis[gsi["name"]] = {
                "hash_key": _norm_key(gsi.get("hash_key"), f"{origin} {suffix}/{gsi['name']}"),
                "range_key": _norm_key(gsi.get("range_key"), f"{origin} {suffix}/{gsi['name']}"),
            }
            if "projection" in gsi and gsi["projection"] not in (None, "ALL", "All"):
                gsis[gsi["name"]]["projection"] = gsi["projection"]
        result[suffix] = {
            "hash_key": _norm_key(table.get("hash_key"), f"{origin} {suffix}"),
            "range_key": _norm_key(table.get("range_key"), f"{origin} {suffix}"),
            "stream": stream,
            "gsis": gsis,
        }
    return result


def fmt_key(key: Optional[Tuple[str, str]]) -> str:
    return "none" if key is None else f"{key[0]} ({key[1]})"


def diff_tables(code: Dict[str, Dict[str, Any]], tf: Dict[str, Dict[str, Any]], label: str) -> List[str]:
    diffs: List[str] = []
    for suffix in sorted(set(code) | set(tf)):
        if suffix not in tf:
            diffs.append(f"table '{suffix}' is in {label} but not in terraform")
            continue
        if suffix not in code:
            diffs.append(f"table '{suffix}' is in terraform but not in {label}")
            continue
        c, t = code[suffix], tf[suffix]
        for field in ("hash_key", "range_key"):
            if c[field] != t[field]:
                diffs.append(f"{suffix}: {field}: {label} {fmt_key(c[field])} != terraform {fmt_key(t[field])}")
        if c["stream"] != t["stream"]:
            diffs.append(f"{suffix}: stream: {label} {c['stream']} != terraform {t['stream']}")
        for gname in sorted(set(c["gsis"]) | set(t["gsis"])):
            if gname not in t["gsis"]:
                diffs.append(f"{suffix}: GSI '{gname}' is in {label} but not in terraform")
                continue
            if gname not in c["gsis"]:
                diffs.append(f"{suffix}: GSI '{gname}' is in terraform but not in {label}")
                continue
            for field in ("hash_key", "range_key"):
                cv, tv = c["gsis"][gname][field], t["gsis"][gname][field]
                if cv != tv:
                    diffs.append(f"{suffix}/{gname}: {field}: {label} {fmt_key(cv)} != terraform {fmt_key(tv)}")
            if "projection" in c["gsis"][gname]:
                diffs.append(
                    f"{suffix}/{gname}: projection: {label} {c['gsis'][gname]['projection']} != terraform ALL"
                )
    return diffs


def check_tables(directory: Path, code_tables: List[str], report: Report) -> None:
    try:
        tf_tables = tt.load_tables(directory)
    except tt.TerraformTablesError as exc:
        report.error(f"terraform tables: {exc}")
        return
    except Exception as exc:  # parse errors are already reported above
        report.error(f"terraform tables could not be read: {exc}")
        return
    report.ok(f"terraform defines tables {[t['name_suffix'] for t in tf_tables]}")
    tf_norm = normalise(tf_tables, "terraform")
    for source in code_tables:
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
            code_norm = normalise(json.loads(text), source)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.error(f"cannot read table definitions from {source}: {exc}")
            continue
        diffs = diff_tables(code_norm, tf_norm, source)
        if diffs:
            for line in diffs:
                report.error(f"table mismatch: {line}")
        else:
            report.ok(f"tables in terraform match {source}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        default=str(Path(__file__).resolve().parent.parent / "terraform"),
        help="terraform directory (default: <repo>/terraform)",
    )
    parser.add_argument(
        "--code-tables",
        action="append",
        default=[],
        metavar="FILE",
        help="JSON table definitions to compare with terraform (repeatable; '-' = stdin)",
    )
    args = parser.parse_args(argv)
    directory = Path(args.dir)

    report = Report()
    parsed = parse_all(directory, report)
    if parsed:
        check_references(parsed, report)
        check_tfvars_example(directory, parsed, report)
    check_text(directory, report)
    check_tables(directory, args.code_tables, report)

    if report.errors:
        print(f"\nterraform checks: {len(report.errors)} problem(s)")
        return 1
    print("\nterraform checks: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
