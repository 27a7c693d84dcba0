#!/usr/bin/env python3
"""Runs the example commands of the README and the book against a live embedded service.

A shell code block (```bash, ```sh or ```shell) runs when an HTML comment right before it marks
it (comments are invisible on GitHub and in the book):

    <!-- example: run -->
    <!-- example: expect "\"status\":\"allocated\"" -->     (optional, any number)
    <!-- example: service TRACK_QUOTAS=azure-lab=5 -->      (optional)
    ```bash
    curl -s http://127.0.0.1:8080/healthz
    ```

For each file, the marked blocks run in order, in one bash process with `-Eeuo pipefail`, so a
variable one block sets is there in the next (as for a reader who pastes them into one
terminal). Each file gets a fresh service: the API binary with the embedded store in a temporary
directory, the demo pool, the built-in dev tokens and the default job loops, on a free
127.0.0.1 port; `http://127.0.0.1:8080` in a block is replaced with its address. A block with a
`service` marker runs against a second service started with those settings added (the example
that shows a setting at work); the blocks after it use the file's service again, and variables
carry on as before. Blocks see no BROKER_* variable from the caller:
an example names what it needs. The binaries' directory (`--bin-dir`) is first on PATH, so
`brokerctl` is the one just built.

A run fails, naming the file and line, when a block exits non-zero, lacks an expected text in
its output (stdout and stderr), runs past the time limit, or when a marker is malformed or not
followed by a shell block. It reports how many blocks ran and which shell blocks are unmarked,
per file. Exit code 0 only when every marked block passed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SHELL_LANGS = {"bash", "sh", "shell"}
DOC_URL = "http://127.0.0.1:8080"
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<body>.*?)\s*-->\s*$")
BANNER = re.compile(r"^Sandbox Broker listening on (http://[0-9.:]+)")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class MarkerError(Exception):
    """A marker that cannot be used, with its file and line."""


@dataclass
class Block:
    path: Path
    line: int  # line of the opening fence (1-based)
    lang: str
    text: str
    run: bool = False
    expects: list[str] = field(default_factory=list)
    service: dict[str, str] | None = None  # settings of a new service, when marked

    @property
    def first_line(self) -> int:
        return self.line + 1


def parse(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, with the markers right before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        if marker:
            pending.append((i + 1, marker.group("body")))
            i += 1
            continue
        opened = FENCE.match(line)
        if not opened:
            if line.strip() and pending:
                raise MarkerError(f"{path}:{pending[0][0]}: an example marker must be right before a code block")
            i += 1
            continue
        indent, fence, lang = opened.group("indent"), opened.group("fence"), opened.group("lang").lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            raw = lines[j]
            body.append(raw[len(indent):] if raw.startswith(indent) else raw.lstrip())
            j += 1
        block = Block(path=path, line=i + 1, lang=lang, text="\n".join(body) + "\n")
        for at, text in pending:
            apply_marker(block, at, text)
        if pending and lang not in SHELL_LANGS:
            raise MarkerError(f"{path}:{pending[0][0]}: an example marker before a ```{lang or 'text'} block; only bash, sh and shell blocks run")
        if pending and not block.run:
            raise MarkerError(f"{path}:{pending[0][0]}: markers without `example: run`")
        pending = []
        blocks.append(block)
        i = j + 1
    if pending:
        raise MarkerError(f"{path}:{pending[0][0]}: an example marker at the end of the file")
    return blocks


def apply_marker(block: Block, at: int, text: str) -> None:
    where = f"{block.path}:{at}"
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise MarkerError(f"{where}: unreadable marker ({e}): {text}") from e
    if not words:
        raise MarkerError(f"{where}: an empty example marker")
    kind, args = words[0], words[1:]
    if kind == "run" and not args:
        block.run = True
    elif kind == "expect" and len(args) == 1 and args[0]:
        block.expects.append(args[0])
    elif kind == "service" and args and all("=" in a for a in args):
        block.service = dict(a.split("=", 1) for a in args)
    else:
        raise MarkerError(f"{where}: unknown example marker (run | expect \"text\" | service NAME=value …): {text}")


def clean_env(bin_dir: Path) -> dict[str, str]:
    """What a reader's shell would have: PATH (the fresh binaries first), HOME, the toolchain's
    own variables; never the caller's BROKER_* or proxies."""
    keep = ["HOME", "USER", "LANG", "TMPDIR"]
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(("CARGO", "RUST"))}
    # The test runner's own variables are not a reader's (`cargo test` sets CARGO_PKG_*, …).
    env = {k: v for k, v in env.items() if not k.startswith(("CARGO_PKG", "CARGO_MANIFEST", "CARGO_BIN", "CARGO_CRATE"))}
    env.pop("RUST_LOG", None)
    env["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env.setdefault("LANG", "C.UTF-8")
    return env


class Service:
    """The API binary on a free loopback port with a fresh embedded store."""

    def __init__(self, bin_dir: Path, settings: dict[str, str], work: Path, start_timeout: float):
        self.work = work
        self.log_path = work / "service.log"
        env = clean_env(bin_dir)
        env.update(
            {
                "BIND_ADDR": "127.0.0.1:0",
                "STORE": "embedded",
                "EMBEDDED_PATH": str(work / "broker.db"),
                "SEED_DEMO_POOL": "true",
                "LOG_FORMAT": "json",
            }
        )
        env.update(settings)
        self.log = open(self.log_path, "w", encoding="utf-8")
        stdout = work / "service.out"
        self.out = open(stdout, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [str(bin_dir / "command-api")], env=env, stdout=self.out, stderr=self.log, stdin=subprocess.DEVNULL
        )
        self.url = ""
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            for line in stdout.read_text(encoding="utf-8").splitlines():
                found = BANNER.match(line)
                if found:
                    self.url = found.group(1)
            if self.url:
                break
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        if not self.url:
            self.stop()
            raise RuntimeError("the service did not start:\n" + self.tail())

    def tail(self, lines: int = 30) -> str:
        text = (self.work / "service.out").read_text(encoding="utf-8") + self.log_path.read_text(encoding="utf-8")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        self.out.close()


@dataclass
class Failure:
    where: str
    what: str
    output: str = ""


def run_blocks(blocks: list[Block], urls: list[str], env: dict[str, str], work: Path, timeout: float) -> tuple[Failure | None, int]:
    """Runs `blocks` in one bash process, block n against the service at `urls[n]`; the first
    failure, if any, and the index of the block it is in."""
    status = work / "status"
    progress = work / "progress"
    script: list[str] = [
        "set -Eeuo pipefail",
        f"__status={shlex.quote(str(status))}",
        f"__progress={shlex.quote(str(progress))}",
        # Which block, at which line of this script, and the exit status: what failed.
        "trap '__rc=$?; printf \"%s %s %s\\n\" \"$__block\" \"$LINENO\" \"$__rc\" >\"$__status\"' ERR",
    ]
    starts: list[int] = []
    for n, block in enumerate(blocks):
        log = work / f"block-{n}.log"
        script.append(f"__block={n}; echo {n} >\"$__progress\"")
        script.append("{")
        starts.append(len(script) + 1)
        script.extend(block.text.replace(DOC_URL, urls[n]).rstrip("\n").split("\n"))
        script.append(f"}} >{shlex.quote(str(log))} 2>&1 </dev/null")
    script.append("echo done >\"$__progress\"")
    path = work / "examples.sh"
    path.write_text("\n".join(script) + "\n", encoding="utf-8")
    # Its own process group, so that a block still running at the time limit is stopped with
    # everything it started (a curl that hangs, a follower that never ends).
    shell = subprocess.Popen(["bash", str(path)], env=env, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc: int | None = shell.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
        rc = None
    reached = progress.read_text().strip() if progress.exists() else "0"
    done = len(blocks) if reached == "done" else int(reached or 0)

    def output(n: int) -> str:
        log = work / f"block-{n}.log"
        text = ANSI.sub("", log.read_text(encoding="utf-8", errors="replace")) if log.exists() else ""
        return text

    # Expected output of the blocks that completed, in order: the first problem is reported.
    for n in range(done if rc != 0 else len(blocks)):
        for wanted in blocks[n].expects:
            if wanted not in output(n):
                return Failure(f"{blocks[n].path}:{blocks[n].line}", f"the output lacks {wanted!r}", output(n)), n
    if rc == 0:
        return None, 0
    done = min(done, len(blocks) - 1)
    block = blocks[done]
    if rc is None:
        return Failure(f"{block.path}:{block.line}", f"still running after {timeout:.0f} s", output(done)), done
    line = block.line
    if status.exists():
        parts = status.read_text().split()
        if len(parts) == 3 and parts[0].isdigit():
            n = int(parts[0])
            block = blocks[n]
            line = block.first_line + max(0, int(parts[1]) - starts[n])
            rc = int(parts[2])
            done = n
    return Failure(f"{block.path}:{line}", f"exited {rc}", output(done)), done


def run_file(path: Path, blocks: list[Block], bin_dir: Path, timeout: float, start_timeout: float) -> Failure | None:
    """Starts the file's service (and one per distinct `service` marker) and runs its marked
    blocks in order; the first failure, if any."""
    marked = [b for b in blocks if b.run]
    work = Path(tempfile.mkdtemp(prefix="broker-examples-"))
    services: dict[tuple[tuple[str, str], ...], Service] = {}
    try:
        urls = []
        for block in marked:
            key = tuple(sorted((block.service or {}).items()))
            if key not in services:
                home = work / f"service-{len(services)}"
                home.mkdir()
                try:
                    services[key] = Service(bin_dir, dict(key), home, start_timeout)
                except RuntimeError as e:
                    return Failure(f"{path}:{block.line}", str(e))
            urls.append(services[key].url)
        started = time.monotonic()
        failure, at = run_blocks(marked, urls, clean_env(bin_dir), work, timeout)
        spent = time.monotonic() - started
        if failure is None:
            lines = ", ".join(str(b.line) for b in marked)
            print(f"  ok: the blocks at lines {lines} in {spent:.1f} s")
            return None
        print(f"  FAILED: {failure.what} at {failure.where}")
        service = services[tuple(sorted((marked[at].service or {}).items()))]
        failure.output += "\n--- service log (last lines) ---\n" + service.tail(15)
        return failure
    finally:
        for service in services.values():
            service.stop()
        shutil.rmtree(work, ignore_errors=True)


ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", required=True, type=Path, help="directory with command-api and brokerctl")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per file (default 120)")
    parser.add_argument("--start-timeout", type=float, default=60, help="seconds for the service to start (default 60)")
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/**/*.md)")
    args = parser.parse_args()
    bin_dir = args.bin_dir.resolve()
    for binary in ("command-api", "brokerctl"):
        if not (bin_dir / binary).is_file():
            print(f"run_examples.py: no {binary} in {bin_dir}", file=sys.stderr)
            return 2
    files = args.files or [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

    parsed: list[tuple[Path, list[Block]]] = []
    problems: list[str] = []
    for path in files:
        try:
            parsed.append((path, parse(path)))
        except MarkerError as e:
            problems.append(str(e))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1

    ran = 0
    report: list[str] = []
    failures: list[Failure] = []
    started = time.monotonic()
    for path, blocks in parsed:
        shown = path.relative_to(ROOT) if path.is_absolute() and ROOT in path.parents else path
        shell = [b for b in blocks if b.lang in SHELL_LANGS]
        marked = [b for b in shell if b.run]
        unmarked = [b for b in shell if not b.run]
        if not shell:
            continue
        outcome = f"{len(marked)} ran"
        if marked:
            print(f"{shown}: {len(marked)} marked block(s)")
            failure = run_file(path, blocks, bin_dir, args.timeout, args.start_timeout)
            if failure is None:
                ran += len(marked)
            else:
                failures.append(failure)
                outcome = f"FAILED ({len(marked)} marked)"
        lines = ", ".join(str(b.line) for b in unmarked)
        report.append(f"  {shown}: {outcome}, {len(unmarked)} unmarked" + (f" (lines {lines})" if unmarked else ""))

    print(f"\nexample blocks: {ran} ran in {time.monotonic() - started:.0f} s; per file:")
    print("\n".join(report))
    for failure in failures:
        where = failure.where
        try:
            where = str(Path(where.split(":")[0]).relative_to(ROOT)) + ":" + where.split(":")[1]
        except ValueError:
            pass
        print(f"\nFAILED {where}: {failure.what}", file=sys.stderr)
        if failure.output.strip():
            print("--- output ---\n" + "\n".join(failure.output.splitlines()[-40:]), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
