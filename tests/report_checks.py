"""The browser check every report kind's test uses (harmonize.report.browser)."""

from __future__ import annotations

from pathlib import Path

import pytest


def assert_reads_cleanly_in_a_browser(path: Path, name: str) -> dict:
    """Open a report in headless Chromium: no console error, no request outside the
    file, nothing wider than a 1280 px viewport, every image decoded, every link found,
    an answer at the top. Skips when no Chromium is installed. With HARMONIZE_SCREENSHOTS
    set, the first screen is saved there as report_NAME.png (docs/img is made so)."""
    import os

    from harmonize.report.browser import check_report, find_browser, problems

    if find_browser() is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium; .ci/run installs it): "
                    "the browser check of the reports is skipped")
    folder = os.environ.get("HARMONIZE_SCREENSHOTS")
    shot = Path(folder) / f"report_{name}.png" if folder else None
    result = check_report(path, shot)
    assert not problems(result), f"{name} ({path}): {problems(result)}"
    assert result["answer"], f"{name}: no answer sentence at the top"
    return result
