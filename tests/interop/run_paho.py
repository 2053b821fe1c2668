#!/usr/bin/env python3
"""Run the Eclipse Paho MQTT interoperability tests against any broker.

Runs interoperability/client_test.py (MQTT 3.1.1, 10 tests) and/or
interoperability/client_test5.py (MQTT 5.0, 27 tests) from a checkout of
eclipse/paho.mqtt.testing, pointing them at --host/--port (their own
__main__ ignores those options).

Every suite (or, with --isolate, every test) runs in a child process so a
hung test cannot hang the runner:
  * per-test timeout (--test-timeout, SIGALRM inside the child);
  * hard wall-clock limit for the whole run (--timeout); the child's process
    group is killed and unfinished tests are reported as FAIL (timeout).

Output: one line per test, 'PASS v5.test_basic (3.2s)' or
'FAIL v5.test_will_delay (12.0s): <reason>', then per suite
'paho v3: 10 tests, 9 passed, 1 failed' and finally the plain line
'paho: N passed, M failed'.
Exit status: 0 if every test passed (or failed only where --allow-fail
names it), 1 if any other test failed, 2 on a usage/setup error.

Example:
  python3 run_paho.py --host 127.0.0.1 --port 1883 --suite both
  python3 run_paho.py --port 18830 --suite 5 -k will_delay -k keepalive -v
"""

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PAHO_DIR = os.environ.get(
    "PAHO_TESTING_DIR",
    os.path.join(HERE, "paho.mqtt.testing", "interoperability"))

SUITES = {"3": ("v3", "client_test"), "5": ("v5", "client_test5")}
MARK = "@@PAHO_RESULT "

# Globals that the test modules' own __main__ would set (client ids
# "myclientid", "myclientid2", "clean retained" and "" are hard-coded in the
# modules).  client_test5.setUpClass() calls setData(), which resets
# topics/wildtopics to the unprefixed lists below, so in practice both suites
# use the same topic names; topic_prefix is only used by
# test_shared_subscriptions ($share/sharename/client_test5/x).
TOPICS = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
WILDTOPICS = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
NOSUBSCRIBE_TOPICS = ("test/nosubscribe",)
V5_TOPIC_PREFIX = "client_test5/"


# ----------------------------------------------------------------- child ---

class TestTimeout(BaseException):
    """Raised by SIGALRM inside a test that overran --test-timeout.
    BaseException so the tests' 'except Exception' does not hide it; tests
    with a bare 'except:' may swallow it, so the alarm re-arms itself."""


def child_main(args):
    import unittest
    import logging

    sys.path.insert(0, args.paho_dir)
    os.chdir(args.paho_dir)
    logging.getLogger().setLevel(logging.ERROR)

    label, modname = SUITES[args.suite]
    mod = __import__(modname)
    mod.host = args.host
    mod.port = args.port
    mod.topics = TOPICS
    mod.wildtopics = WILDTOPICS
    nosub = tuple(args.nosubscribe_topic) if args.nosubscribe_topic else NOSUBSCRIBE_TOPICS
    mod.nosubscribe_topics = nosub
    if args.suite == "5":
        mod.topic_prefix = V5_TOPIC_PREFIX
        orig_setdata = mod.setData

        def setData():  # keep upstream behaviour, but honour our overrides
            orig_setdata()
            mod.nosubscribe_topics = nosub
        mod.setData = setData

    out_fd = os.dup(1)

    def emit(**kw):
        # one small write() is atomic on a pipe, so result lines never get
        # interleaved with output from the clients' background threads
        os.write(out_fd, ("\n" + MARK + json.dumps(kw) + "\n").encode())

    def on_alarm(signum, frame):
        signal.alarm(2)  # keep firing in case a bare 'except:' swallows it
        raise TestTimeout("test exceeded %ss timeout" % args.test_timeout)

    signal.signal(signal.SIGALRM, on_alarm)

    class Result(unittest.TestResult):
        def startTest(self, test):
            super().startTest(test)
            self._t0 = time.time()
            signal.alarm(args.test_timeout)
            print("=== START %s.%s" % (label, test._testMethodName), flush=True)

        def stopTest(self, test):
            signal.alarm(0)
            super().stopTest(test)

        def _report(self, test, status, err=None):
            name = getattr(test, "_testMethodName", None) or str(test)
            reason = ""
            if err is not None:
                etype, evalue, _ = err
                reason = "%s: %s" % (etype.__name__, str(evalue).strip().splitlines()[0]
                                     if str(evalue).strip() else "")
                print("".join(traceback.format_exception(*err)), flush=True)
            dur = time.time() - getattr(self, "_t0", time.time())
            emit(test="%s.%s" % (label, name), status=status, secs=round(dur, 1),
                 reason=reason[:300])

        def addSuccess(self, test):
            super().addSuccess(test)
            self._report(test, "PASS")

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self._report(test, "FAIL", err)

        def addError(self, test, err):
            super().addError(test, err)
            # setUpClass failure arrives as an _ErrorHolder, not a test
            if not hasattr(test, "_testMethodName"):
                emit(test="%s.<setUpClass>" % label, status="ERROR", secs=0,
                     reason="%s: %s" % (err[0].__name__, str(err[1])[:300]))
                print("".join(traceback.format_exception(*err)), flush=True)
                return
            self._report(test, "FAIL", err)

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            emit(test="%s.%s" % (label, test._testMethodName), status="SKIP",
                 secs=0, reason=reason)

    loader = unittest.TestLoader()
    names = loader.getTestCaseNames(mod.Test)
    if args.tests:
        wanted = args.tests.split(",")
        names = [n for n in names if n in wanted]
    suite = unittest.TestSuite([mod.Test(n) for n in names])
    signal.alarm(args.test_timeout)  # also bounds setUpClass (cleanup)
    try:
        suite.run(Result())
    except TestTimeout:
        emit(test="%s.<setUpClass>" % label, status="ERROR", secs=0,
             reason="timeout outside a test")
    signal.alarm(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # don't wait for the clients' background threads


# ---------------------------------------------------------------- parent ---

def list_tests(paho_dir, suite):
    """Test names in unittest order, found by parsing the source (no import)."""
    import ast
    path = os.path.join(paho_dir, SUITES[suite][1] + ".py")
    tree = ast.parse(open(path).read())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Test":
            return sorted(n.name for n in node.body
                          if isinstance(n, ast.FunctionDef) and n.name.startswith("test"))
    raise SystemExit("no class Test in %s" % path)


def run_child(args, suite, tests, deadline, log, results):
    """Run one child; collect results into dict name->(status, secs, reason)."""
    label = SUITES[suite][0]
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--child",
           "--suite", suite, "--host", args.host, "--port", str(args.port),
           "--paho-dir", args.paho_dir, "--test-timeout", str(args.test_timeout),
           "--tests", ",".join(tests)]
    for t in args.nosubscribe_topic or []:
        cmd += ["--nosubscribe-topic", t]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    buf = b""
    killed = None
    # bound a single child too: all its tests plus setUpClass, plus slack
    child_deadline = min(deadline, time.time() + (len(tests) + 1) * args.test_timeout + 30)
    while True:
        remaining = child_deadline - time.time()
        if remaining <= 0:
            killed = ("global --timeout %ss" % args.timeout if child_deadline >= deadline
                      else "child time limit")
            break
        r, _, _ = select.select([proc.stdout], [], [], min(remaining, 1.0))
        if r:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                handle_line(line.decode("utf-8", "replace"), args, log, results)
        elif proc.poll() is not None and not r:
            # process gone; drain anything left
            rest = proc.stdout.read() or b""
            buf += rest
            for line in buf.split(b"\n"):
                if line:
                    handle_line(line.decode("utf-8", "replace"), args, log, results)
            buf = b""
            break
    if killed:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for t in tests:
        name = "%s.%s" % (label, t)
        if name not in results:
            if killed:
                what = "killed while running" if CURRENT[0] == name else "not run"
                reason = "%s: %s" % (what, killed)
            elif SETUP_ERR[0]:
                reason = "setUpClass (cleanup) failed: %s" % SETUP_ERR[0]
            else:
                reason = "no result (child exited %s)" % proc.returncode
            report(name, "FAIL", 0, reason, results)
    CURRENT[0] = None
    SETUP_ERR[0] = None
    return killed


CURRENT = [None]  # test the child last announced as started
SETUP_ERR = [None]  # setUpClass failure reported by the child


def report(name, status, secs, reason, results):
    results[name] = (status, secs, reason)
    line = "%s %s (%.1fs)" % (status, name, secs)
    if status != "PASS" and reason:
        line += ": " + reason
    print(line, flush=True)


def handle_line(line, args, log, results):
    idx = line.find(MARK)
    if idx >= 0:
        if idx > 0:
            log.write(line[:idx] + "\n")
        d = json.loads(line[idx + len(MARK):])
        if d["status"] == "ERROR":  # setUpClass problem: tests then get no result
            SETUP_ERR[0] = d["reason"]
            print("ERROR %s: %s" % (d["test"], d["reason"]), flush=True)
            log.write(line + "\n")
            return
        report(d["test"], d["status"], d["secs"], d["reason"], results)
    elif line:
        if line.startswith("=== START "):
            CURRENT[0] = line[len("=== START "):].strip()
        log.write(line + "\n")
        log.flush()
        if args.verbose:
            print("    | " + line, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1",
                    help="broker IPv4 address or name (tests use AF_INET) [127.0.0.1]")
    ap.add_argument("--port", type=int, default=1883, help="broker port [1883]")
    ap.add_argument("--suite", choices=["3", "5", "both"], default="both")
    ap.add_argument("-k", dest="patterns", action="append", default=[],
                    help="only tests whose name contains this, case-insensitive (repeatable)")
    ap.add_argument("--isolate", action="store_true",
                    help="run each test in its own process (each re-runs the "
                         "suite's setUpClass cleanup; slower, no cross-test state)")
    ap.add_argument("--test-timeout", type=int, default=60,
                    help="seconds per test [60]")
    ap.add_argument("--timeout", type=int, default=900,
                    help="hard limit for the whole run, seconds [900]")
    ap.add_argument("--allow-fail", action="append", default=[],
                    help="test allowed to fail without failing the exit code, "
                         "e.g. v5.test_flow_control2 or test_will_delay (repeatable)")
    ap.add_argument("--nosubscribe-topic", action="append",
                    help="topic filter the broker refuses subscriptions to "
                         "[test/nosubscribe]")
    ap.add_argument("--paho-dir", default=DEFAULT_PAHO_DIR,
                    help="paho.mqtt.testing/interoperability dir [%(default)s]")
    ap.add_argument("--log", default=None,
                    help="file for the tests' own output [/tmp/run_paho.<pid>.log]")
    ap.add_argument("--json", default=None, help="also write results as JSON here")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="echo the tests' own output")
    ap.add_argument("--list", action="store_true", help="list tests and exit")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tests", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        try:
            child_main(args)
        except SystemExit:
            raise
        except BaseException:
            traceback.print_exc()
            os._exit(3)
        return

    if not os.path.isfile(os.path.join(args.paho_dir, "client_test.py")):
        print("paho interoperability dir not found: %s" % args.paho_dir, file=sys.stderr)
        sys.exit(2)

    suites = ["3", "5"] if args.suite == "both" else [args.suite]
    plan = []
    for s in suites:
        names = list_tests(args.paho_dir, s)
        if args.patterns:
            names = [n for n in names
                     if any(p.lower() in n.lower() for p in args.patterns)]
        plan.append((s, names))
    if args.list:
        for s, names in plan:
            for n in names:
                print("%s.%s" % (SUITES[s][0], n))
        return

    log_path = args.log or "/tmp/run_paho.%d.log" % os.getpid()
    log = open(log_path, "w")
    print("paho interop: broker %s:%d, suites %s, log %s" %
          (args.host, args.port, ",".join("v" + s for s in suites), log_path), flush=True)
    deadline = time.time() + args.timeout
    results = {}
    t0 = time.time()
    for s, names in plan:
        if not names:
            continue
        if args.isolate:
            for n in names:
                run_child(args, s, [n], deadline, log, results)
        else:
            run_child(args, s, names, deadline, log, results)

    allowed = set(args.allow_fail)
    bad = []
    total_p = total_f = 0
    for s, names in plan:
        label = SUITES[s][0]
        keys = ["%s.%s" % (label, n) for n in names]
        p = sum(1 for k in keys if results.get(k, ("FAIL",))[0] == "PASS")
        sk = sum(1 for k in keys if results.get(k, ("FAIL",))[0] == "SKIP")
        f = len(keys) - p - sk
        total_p += p
        total_f += f
        line = "paho %s: %d tests, %d passed, %d failed" % (label, len(keys), p, f)
        if sk:
            line += ", %d skipped" % sk
        failed = [k for k in keys if results.get(k, ("FAIL",))[0] not in ("PASS", "SKIP")]
        if failed:
            line += "  [failed: %s]" % ", ".join(k.split(".", 1)[1] for k in failed)
        print(line)
        for k in failed:
            if k not in allowed and k.split(".", 1)[1] not in allowed:
                bad.append(k)
    print("elapsed %.0fs; tests' output in %s" % (time.time() - t0, log_path))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({k: {"status": v[0], "secs": v[1], "reason": v[2]}
                       for k, v in results.items()}, fh, indent=1, sort_keys=True)
    print("paho: %d passed, %d failed" % (total_p, total_f))
    if bad and allowed:
        print("not allowed to fail: %s" % ", ".join(bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
