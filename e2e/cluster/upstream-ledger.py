#!/usr/bin/env python3
"""The upstream storage suite's results, kept across runs.

Under TCG the whole selection (288 specs) takes longer than any one run, so each run
(bounded by ENBD_UPSTREAM_TIMEOUT, ginkgo's spec order randomised by its seed) covers part of
it. This reads the JUnit report(s) a run wrote and merges every spec that ran, or was skipped
by the suite itself, into a ledger (tab-separated: spec, state, commit, date), a spec's newest
result replacing an older one; specs the run did not reach keep what the ledger had. It
prints this run's counts and the ledger's.

usage: e2e/cluster/upstream-ledger.py REPORT_DIR LEDGER COMMIT
  REPORT_DIR  the suite's -report-dir (junit*.xml in it)
  LEDGER      e2e/cluster/upstream-results.tsv (created if missing)
  COMMIT      the commit the run tested (recorded per spec)
"""

import datetime
import glob
import os
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


def read_reports(report_dir):
    out = {}
    files = sorted(glob.glob(os.path.join(report_dir, "**", "junit*.xml"), recursive=True))
    if not files:
        sys.exit(f"upstream-ledger.py: no junit*.xml under {report_dir}")
    for path in files:
        for case in ET.parse(path).getroot().iter("testcase"):
            name = " ".join((case.get("name") or "").split())
            # Only this driver's specs; the report also lists every spec the focus left out.
            if "csi.enbd.io" not in name:
                continue
            state = spec_state(case)
            if state is not None:
                out[name] = state
    return out


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


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    report_dir, ledger_path, commit = sys.argv[1:]
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


if __name__ == "__main__":
    main()
