#!/usr/bin/env python3
"""Link check for README.md and the book under docs/ (run by scripts/check-docs.sh).

Sources (README.md and docs/**/*.md): every relative link and image must point at a file or
folder that exists; a `#anchor` must match a heading of the target page, slugged as mdBook and
GitHub do (lower case; letters, digits, `_` and `-` kept; spaces become `-`; other characters
dropped; a repeated slug gets `-1`, `-2`, …). A book page may link only inside docs/, since the
rendered book holds nothing else, and a page it links to must be in docs/SUMMARY.md. Every
Markdown file under docs/ must be in docs/SUMMARY.md, and so must every ADR.

Rendered book (with --html DIR): every relative href of every chapter page must name a file in
DIR, and its `#anchor` an id on that page. This catches what mdBook does to links (`.md` →
`.html`, `README.md` → `index.html`).

Prints one line per broken link (`file:line: link: why`) and exits 1 if there is any.
Standard library only.
"""

from __future__ import annotations

import argparse
import html.parser
import re
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
ATX = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](dest "title") and ![alt](dest); dest may be <…>. Nested brackets one level deep.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HTML_ATTR = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def strip_inline_code(line: str) -> str:
    return INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def lines_outside_code(text: str):
    """Yields (line number, line) for lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)[0] * 3
                continue
            yield number, line
        elif m and m.group(1).startswith(fence):
            fence = None


def heading_text(raw: str) -> str:
    """The text a heading renders to: code spans keep their content, links their text."""
    text = INLINE_CODE.sub(lambda m: m.group(2).strip(), raw)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("**", "").replace("*", "")
    return text.strip()


def slug(text: str) -> str:
    out = []
    for ch in text.lower():
        if ch.isalnum() or ch in "_-":
            out.append(ch)
        elif ch.isspace():
            out.append("-")
    return "".join(out)


_anchor_cache: dict[Path, set[str]] = {}


def anchors_of(path: Path) -> set[str]:
    if path not in _anchor_cache:
        seen: dict[str, int] = {}
        ids = set()
        for _, line in lines_outside_code(path.read_text(encoding="utf-8")):
            m = ATX.match(line)
            if not m:
                continue
            base = slug(heading_text(m.group(2)))
            n = seen.get(base, 0)
            seen[base] = n + 1
            ids.add(base if n == 0 else f"{base}-{n}")
        _anchor_cache[path] = ids
    return _anchor_cache[path]


def links_of(path: Path):
    """Yields (line number, destination) for every link in a Markdown file."""
    for number, line in lines_outside_code(path.read_text(encoding="utf-8")):
        plain = strip_inline_code(line)
        for m in INLINE_LINK.finditer(plain):
            yield number, m.group(1).strip("<>")
        m = REF_DEF.match(plain)
        if m:
            yield number, m.group(1).strip("<>")
        for m in HTML_ATTR.finditer(plain):
            yield number, m.group(1)


def summary_pages() -> set[Path]:
    pages = set()
    summary = DOCS / "SUMMARY.md"
    for _, dest in links_of(summary):
        if dest:
            pages.add((DOCS / urllib.parse.unquote(dest.split("#")[0])).resolve())
    return pages


def check_sources(errors: list[str]) -> None:
    in_summary = summary_pages()
    files = [ROOT / "README.md"] + sorted(DOCS.rglob("*.md"))
    for path in files:
        rel = path.relative_to(ROOT)
        in_book = DOCS in path.parents
        if in_book and path.name != "SUMMARY.md" and path.resolve() not in in_summary:
            errors.append(f"{rel}: not listed in docs/SUMMARY.md (the book would not render it)")
        for number, dest in links_of(path):
            where = f"{rel}:{number}: {dest}"
            if not dest or SCHEME.match(dest) or dest.startswith("//"):
                continue
            target_part, _, anchor = dest.partition("#")
            if target_part:
                target = (path.parent / urllib.parse.unquote(target_part)).resolve()
            else:
                target = path.resolve()
            if not target.exists():
                errors.append(f"{where}: no such file")
                continue
            if in_book and DOCS.resolve() not in target.parents and target != DOCS.resolve():
                errors.append(f"{where}: leaves docs/ (the rendered book has only docs/; name the path in code instead)")
                continue
            if target.suffix == ".md" and in_book and target_part and target not in in_summary:
                errors.append(f"{where}: page not in docs/SUMMARY.md")
            if anchor:
                if target.suffix != ".md":
                    errors.append(f"{where}: anchor on a file that is not Markdown")
                elif anchor not in anchors_of(target):
                    errors.append(f"{where}: no heading with this anchor in {target.relative_to(ROOT)}")


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[tuple[int, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)
            if tag == "a" and name == "href" and value:
                self.hrefs.append((self.getpos()[0], value))


def check_html(out: Path, errors: list[str]) -> None:
    pages: dict[Path, _Page] = {}
    for path in sorted(out.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        pages[path.resolve()] = page
    skip = {"print.html", "toc.html", "404.html"}
    for path, page in pages.items():
        if path.name in skip:
            continue
        rel = path.relative_to(out.resolve())
        for number, href in page.hrefs:
            if SCHEME.match(href) or href.startswith("//"):
                continue
            target_part, _, anchor = href.partition("#")
            target = (path.parent / urllib.parse.unquote(target_part)).resolve() if target_part else path
            if target.is_dir():
                target = target / "index.html"
            where = f"{out.name}/{rel}:{number}: {href}"
            if not target.exists():
                errors.append(f"{where}: no such file in the rendered book")
                continue
            if anchor and target.suffix == ".html":
                ids = pages[target].ids if target in pages else set()
                if urllib.parse.unquote(anchor) not in ids:
                    errors.append(f"{where}: no element with this id in the rendered page")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, help="the rendered book to check as well")
    args = parser.parse_args()
    errors: list[str] = []
    check_sources(errors)
    if args.html:
        check_html(args.html, errors)
    for e in errors:
        print(e)
    checked = "README.md, docs/" + (f" and {args.html}" if args.html else "")
    if errors:
        print(f"check-docs: {len(errors)} broken link(s) in {checked}")
        return 1
    print(f"check-docs: links in {checked} are fine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
