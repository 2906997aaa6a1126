#!/usr/bin/env python3
"""Runs every shell block of the docs as written, so that none of them rots.

    .local/venv/bin/python scripts/doc_blocks.py           run them (CI does)
    .local/venv/bin/python scripts/doc_blocks.py --list    list them, and why each is skipped
    .local/venv/bin/python scripts/doc_blocks.py --only jobs.md   the blocks of one doc

It reads the ```sh / ```bash / ```shell blocks of README.md, BENCHMARKS.md
and docs/*.md. A block runs unless the line before it marks it:

    <!-- doc-block: aws -->       needs an AWS account (never run here)
    <!-- doc-block: docker -->    needs Docker
    <!-- doc-block: ci-stage -->  .ci/run runs each of its commands as a
                                  stage of its own (checked: each line is in
                                  .ci/run)
    <!-- doc-block: file -->      a file's content, not commands (checked
                                  with `bash -n`)
    <!-- doc-block: machine -->   sets up a fresh machine (root, network)
    <!-- doc-block: network -->   needs the internet
    <!-- doc-block: bench -->     a benchmark: a quiet machine, a release build

A block runs with `bash -euo pipefail`, from the checkout's root, with a
time bound, in a process group of its own that is stopped when it ends. It
finds what a reader of that doc has (the binaries on PATH; the AWS CLI;
`FANOUT_QUEUE_URL`, `FANOUT_DEAD_LETTER_QUEUE_URL`, `REPORT_QUEUE_URL` and
`SENDER` set) pointed at a local system this script starts on free ports
of 127.0.0.1 and stops by PID: the emulators, a connections table, the
queues, `fanout-dev gateway` and `fanout run`. It needs the debug binaries
(`cargo build`) and the emulators installed (`scripts/emulators.sh install`).
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import local_resources  # this folder's: the queues and table a local fanout uses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "debug")
VENV_BIN = os.path.join(ROOT, ".local", "venv", "bin")
LANGS = {"sh", "bash", "shell"}
SKIPS = {
    "aws": "needs an AWS account",
    "docker": "needs Docker",
    "machine": "sets up a fresh machine (root, network)",
    "network": "needs the internet",
    "bench": "a benchmark: needs a quiet machine and a release build",
}
CHECKED = {"ci-stage", "file"}
# A block may build (`cargo build`), which on a cold cache takes minutes.
BLOCK_SECONDS = 600
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*doc-block:\s*([\w-]+)\s*-->\s*$")
# Files the blocks name as a reader's own (`fanout enqueue --file picture.png`).
FIXTURES = {"picture.png": b"\x89PNG\r\n\x1a\n" + bytes(64)}


class Block:
    def __init__(self, path, line, lang, marker, code):
        self.path, self.line, self.lang, self.marker, self.code = path, line, lang, marker, code

    def where(self):
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


def blocks():
    paths = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "BENCHMARKS.md")]
    paths += sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    for path in paths:
        lines = open(path, encoding="utf-8").read().split("\n")
        i = 0
        while i < len(lines):
            fence = FENCE.match(lines[i])
            if not fence:
                i += 1
                continue
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            if fence.group(1) in LANGS:
                before = next((l for l in reversed(lines[:i]) if l.strip()), "")
                marker = MARKER.match(before.strip())
                yield Block(path, i + 1, fence.group(1), marker and marker.group(1),
                            "\n".join(lines[i + 1:end]) + "\n")
            i = end + 1


def free_port(avoid=(5320, 5321, 8080)):
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def wait_for(what, seconds, check):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"doc blocks: timed out waiting for {what}")


class LocalSystem:
    """The emulators, a table, the queues, the gateway and a worker."""

    def __init__(self):
        self.ports = {"FANOUT_DEV_EMU_SQS_PORT": str(free_port()),
                      "FANOUT_DEV_EMU_DYNAMODB_PORT": str(free_port())}
        self.procs = []
        self.aws = {}
        self.reader = {}

    def emulators(self, command):
        env = {**os.environ, **self.ports}
        return subprocess.run([os.path.join(ROOT, "scripts", "emulators.sh"), command],
                              env=env, check=True, capture_output=True, text=True).stdout

    def start(self):
        self.emulators("start")
        for line in self.emulators("env").splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            self.aws[name] = value
        self.aws["AWS_DEFAULT_REGION"] = self.aws["AWS_REGION"]
        os.environ.update(self.aws)
        table = "fanout-docs-connections"
        made = local_resources.create("fanout-docs", table)
        gateway = free_port()
        self.spawn("gateway", [os.path.join(BIN, "fanout-dev"), "gateway", "--listen",
                               f"127.0.0.1:{gateway}", "--stage", "docs", "--table", table], {})
        wait_for("the gateway", 30, lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{gateway}/docs/@stats", timeout=1).status == 200)
        self.spawn("worker", [os.path.join(BIN, "fanout"), "run"], {
            **made,
            "FANOUT_CHANNEL_INDEX": "by-channel",
            "FANOUT_CONNECTED_AT_ATTRIBUTE": "connectedAt",
            "FANOUT_GATEWAY_ENDPOINT": f"http://127.0.0.1:{gateway}/docs",
            "FANOUT_RECEIVE_WAIT": "1s",
            "FANOUT_METRICS_LISTEN": "127.0.0.1:0",
        })
        self.reader = {
            **self.aws,
            "FANOUT_QUEUE_URL": made["FANOUT_QUEUE_URL"],
            "FANOUT_DEAD_LETTER_QUEUE_URL": made["FANOUT_DEAD_LETTER_QUEUE_URL"],
            "REPORT_QUEUE_URL": made["FANOUT_REPORT_QUEUE_URL"],
            # A connection id, as a producer excluding its sender has one.
            "SENDER": "L0SM9cOFvHcCIhw=",
            "PATH": os.pathsep.join([self.aws_cli(), BIN, os.environ["PATH"]]),
        }

    def aws_cli(self):
        """A directory with `aws`: the venv's AWS CLI v1, which ignores
        AWS_ENDPOINT_URL_<SERVICE>, given the emulator's endpoint as a
        reader's profile would give it."""
        bin_dir = os.path.join(ROOT, ".local", "doc-blocks-bin")
        os.makedirs(bin_dir, exist_ok=True)
        path = os.path.join(bin_dir, "aws")
        with open(path, "w") as wrapper:
            wrapper.write("#!/usr/bin/env bash\n"
                          f'case "$1" in sqs|sns) exec "{VENV_BIN}/aws" '
                          '--endpoint-url "$AWS_ENDPOINT_URL_SQS" "$@";; esac\n'
                          f'exec "{VENV_BIN}/aws" "$@"\n')
        os.chmod(path, 0o755)
        return bin_dir

    def spawn(self, name, argv, env):
        log = open(os.path.join(ROOT, ".local", f"doc-blocks-{name}.log"), "w")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
        self.procs.append(subprocess.Popen(argv, env={**clean, **env}, stdout=log,
                                           stderr=subprocess.STDOUT))

    def stop(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.emulators("stop")


def run_block(block, reader):
    """Runs one block in a process group of its own; stops the group after."""
    # A reader's shell has no fanout settings but the ones the doc names.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FANOUT_", "AWS_"))}
    env.update(reader)
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.code], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=BLOCK_SECONDS)
        failed = proc.returncode != 0 and f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        out, failed = "", f"still running after {BLOCK_SECONDS} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait()
    return failed, out


def check(block):
    """A marked block's check, or None when it is skipped; '' when it holds."""
    if block.marker == "file":
        result = subprocess.run(["bash", "-n"], input=block.code, text=True,
                                capture_output=True)
        return "" if result.returncode == 0 else f"bash -n: {result.stderr.strip()}"
    if block.marker == "ci-stage":
        ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().split("\n")
        for line in block.code.splitlines():
            command = line.split("#")[0].strip()
            if command and command not in (l.strip() for l in ci):
                return f"`{command}` is not a line of .ci/run"
        return ""
    return None


def main():
    found = list(blocks())
    unknown = [b for b in found if b.marker and b.marker not in SKIPS and b.marker not in CHECKED]
    for b in unknown:
        print(f"{b.where()}: unknown marker `{b.marker}`", file=sys.stderr)
    if unknown:
        return 1
    if "--list" in sys.argv:
        for b in found:
            print(f"{b.where():32} {SKIPS.get(b.marker) or b.marker or 'runs'}")
        return 0
    if "--only" in sys.argv:
        only = sys.argv[sys.argv.index("--only") + 1]
        found = [b for b in found if only in b.where()]
    runs = [b for b in found if not b.marker]
    system = LocalSystem()
    made = []
    failures = []
    try:
        system.start()
        for name, content in FIXTURES.items():
            path = os.path.join(ROOT, name)
            if not os.path.exists(path):
                open(path, "wb").write(content)
                made.append(path)
        for b in found:
            if b.marker in SKIPS:
                print(f"skip {b.where()}: {SKIPS[b.marker]}")
                continue
            started = time.time()
            if b.marker in CHECKED:
                failed, out = check(b), ""
            else:
                failed, out = run_block(b, system.reader)
            took = time.time() - started
            print(f"{'FAIL' if failed else 'ok  '} {b.where()} ({b.marker or 'ran'}, {took:.1f} s)")
            if failed:
                failures.append(b)
                print(f"---- {failed}\n{out}----", flush=True)
    finally:
        for path in made:
            os.remove(path)
        system.stop()
    print(f"doc blocks: {len(runs)} ran, {len(found) - len(runs)} marked, "
          f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
