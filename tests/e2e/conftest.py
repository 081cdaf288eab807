"""Browser tests: say why they were skipped where everyone reads it, in the summary at the end."""


def pytest_terminal_summary(terminalreporter):
    skipped = [report for report in terminalreporter.stats.get("skipped", []) if "tests/e2e/" in report.nodeid]
    if skipped:
        reason = skipped[0].longrepr[2] if isinstance(skipped[0].longrepr, tuple) else str(skipped[0].longrepr)
        terminalreporter.write_sep("-", "browser tests")
        terminalreporter.write_line(f"{len(skipped)} browser test(s) skipped: {reason.removeprefix('Skipped: ')}")
