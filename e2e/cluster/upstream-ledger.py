#!/usr/bin/env python3
"""The upstream storage suite's results, kept across runs.

Under TCG the whole selection (288 specs) takes longer than any one run, so each run
(bounded by ENBD_UPSTREAM_TIMEOUT, ginkgo's spec order randomised by its seed) covers part of
it. This reads the JUnit report(s) a run wrote and merges every spec that ran, or was skipped
by the suite itself, into a ledger (tab-separated: spec, state, commit, date), a spec's newest
result replacing an older one; specs the run did not reach keep what the ledger had. It
prints this run's counts and the ledger's.

A run need not start from nothing: `remaining` reads a dry run of the selection (ginkgo
--dry-run reports every spec the focus selects without running it) and prints a ginkgo focus
regex for each selected spec the ledger has no final result for (none yet, failed, or
interrupted), plus those matching --rerun (specs to run again after a change, e.g. a
capability in test-driver.yaml). `count` prints how many specs a report selected, which
checks those regexes pick exactly the specs meant.

usage: e2e/cluster/upstream-ledger.py {merge,remaining,count} --help
"""

import argparse
import collections
import datetime
import glob
import os
import re
import sys
import xml.etree.ElementTree as ET

STATES = ("passed", "failed", "skipped", "interrupted")


def spec_state(case):
    """A testcase's outcome from ginkgo's JUnit `status` (passed, failed, skipped, pending,
    interrupted, aborted, timedout; older reports lack it and are judged by their children),
    or None for a spec the run's own filters left out (skipped without a message)."""
    status = case.get("status")
    skipped = case.find("skipped")
    if status is None:
        if case.find("failure") is not None or case.find("error") is not None:
            status = "failed"
        else:
            status = "skipped" if skipped is not None else "passed"
    if status == "skipped":
        message = (skipped.get("message") or "") if skipped is not None else ""
        # "skipped" alone: --focus/--skip left it out; "skipped - <reason>": the spec's own skip.
        return "skipped" if message.strip().lower() not in ("", "skipped") else None
    if status in ("interrupted", "aborted", "pending"):
        return "interrupted"
    if status in ("failed", "timedout", "panicked"):
        return "failed"
    return "passed"


def report_cases(report_dir):
    """Every testcase of this driver in the report(s): (name with whitespace folded, case)."""
    files = sorted(glob.glob(os.path.join(report_dir, "**", "junit*.xml"), recursive=True))
    if not files:
        sys.exit(f"upstream-ledger.py: no junit*.xml under {report_dir}")
    for path in files:
        for case in ET.parse(path).getroot().iter("testcase"):
            name = " ".join((case.get("name") or "").split())
            # Only this driver's specs; the report also lists every spec the focus left out.
            if "csi.enbd.io" in name:
                yield name, case


def read_reports(report_dir):
    out = {}
    for name, case in report_cases(report_dir):
        state = spec_state(case)
        if state is not None:
            out[name] = state
    return out


def selected(report_dir):
    """The specs a dry run selected: ginkgo reports them passed, and those the focus left out
    skipped without a reason (spec_state's None)."""
    return sorted({name for name, case in report_cases(report_dir) if spec_state(case) == "passed"})


def focus_regex(name):
    """A ginkgo --focus regex (Go RE2) matching exactly this spec. Ginkgo matches the focus
    against the containers' and the spec's texts joined by spaces, which is the JUnit name
    without its leading "[It] " but after a prefix the report leaves out ("[sig-storage]"):
    so the regex is anchored at the end only (run.sh's second dry run checks the count).
    Python's re.escape is not used: it escapes spaces, which RE2 refuses."""
    text = name[len("[It] "):] if name.startswith("[It] ") else name
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text) + "$"


def read_ledger(path):
    ledger = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                spec, state, commit, date = line.rstrip("\n").split("\t")
                ledger[spec] = (state, commit, date)
    return ledger


def counts(states):
    states = list(states)
    return ", ".join(f"{s} {sum(1 for x in states if x == s)}" for s in STATES)


def remaining(report_dir, ledger_path, rerun):
    ledger = read_ledger(ledger_path)
    specs = selected(report_dir)
    if not specs:
        sys.exit(f"upstream-ledger.py: the dry run under {report_dir} selected no spec of this driver")
    def state(spec):
        return ledger[spec][0] if spec in ledger else "no result"

    final = ("passed", "skipped")
    todo = [s for s in specs if state(s) not in final or (rerun and re.search(rerun, s))]
    summary = ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(map(state, todo)).items()))
    print(f"upstream-ledger.py: {len(todo)} of {len(specs)} selected specs to run ({summary})", file=sys.stderr)
    for s in todo:
        print(focus_regex(s))


def merge(report_dir, ledger_path, commit):
    run = read_reports(report_dir)
    ledger = read_ledger(ledger_path)
    today = datetime.date.today().isoformat()
    for spec, state in run.items():
        if state == "interrupted" and spec in ledger:
            continue  # not reached this time: the older result stands
        ledger[spec] = (state, commit, today)
    with open(ledger_path, "w", encoding="utf-8") as f:
        f.write("# spec\tstate\tcommit\tdate  (e2e/cluster/upstream-ledger.py; newest result per spec)\n")
        for spec in sorted(ledger):
            f.write("\t".join((spec,) + ledger[spec]) + "\n")
    print(f"this run: {len(run)} specs of this driver: {counts(run.values())}")
    print(f"ledger:   {len(ledger)} specs: {counts(s for s, _, _ in ledger.values())}")
    for spec, state in sorted(run.items()):
        if state == "failed":
            print(f"FAILED: {spec}")


def main():
    parser = argparse.ArgumentParser(
        prog="upstream-ledger.py", description="The upstream storage suite's results, kept across runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge a run's JUnit report(s) into the ledger")
    m.add_argument("report_dir", help="the suite's -report-dir (junit*.xml in it)")
    m.add_argument("ledger", help="e2e/cluster/upstream-results.tsv (created if missing)")
    m.add_argument("commit", help="the commit the run tested (recorded per spec)")
    r = sub.add_parser("remaining", help="a focus regex per selected spec with no final result")
    r.add_argument("report_dir", help="a ginkgo --dry-run's -report-dir")
    r.add_argument("ledger")
    r.add_argument("--rerun", metavar="REGEX", help="also the specs this matches")
    c = sub.add_parser("count", help="how many specs of this driver a dry run selected")
    c.add_argument("report_dir")
    args = parser.parse_args()
    if args.command == "merge":
        merge(args.report_dir, args.ledger, args.commit)
    elif args.command == "remaining":
        remaining(args.report_dir, args.ledger, args.rerun)
    else:
        print(len(selected(args.report_dir)))


if __name__ == "__main__":
    main()
