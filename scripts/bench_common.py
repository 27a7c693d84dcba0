"""What the benchmark scripts' reports share: the machine's CPU for the header, and the
replacement of a page's generated section between its markers."""

import platform
import sys


def cpu():
    """The CPU model, as /proc/cpuinfo names it."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(path, name, text):
    """Replaces the part of `path` between `<!-- generated: NAME -->` and its end marker."""
    begin, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
    page = open(path).read()
    if begin not in page or end not in page:
        sys.exit(f"{path} needs the markers {begin} and {end}")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    open(path, "w").write(f"{head}{begin}\n\n{text.rstrip()}\n\n{end}{tail}")
    print(f"wrote {path}", file=sys.stderr)
