"""Take the README's dashboard screenshot: ``python docs/dashboard_screenshot.py RUNS_DIR RUN_ID OUT.png``.

Serves RUNS_DIR with the dashboard on loopback, opens RUN_ID in the tests'
headless Chromium (tests/browser.py) once its plots are drawn, and saves the
whole page. docs/dashboard.png was made from a real 3-site simulated DP run in
which hospital-03's datalist names a label file that does not exist, so it
refuses the fingerprint and every round:

    python -m simulations --sites 3 --rounds 3 --run-config preset=small-unet \
        --min-cases 4 --max-cases 6 --out /tmp/a          # three hospitals' data
    # copy /tmp/a/<run>/data/hospital-0K/ to sites/hospital-0K/, its datalist.json to
    # sites/hospital-0K/hospital-0K.json, and delete sites/hospital-03/labels/case_001.nii.gz
    python -m simulations --rounds 3 --run-config preset=small-unet --out /tmp/b \
        --datalists sites/hospital-01/hospital-01.json sites/hospital-02/hospital-02.json \
                    sites/hospital-03/hospital-03.json
    # the harness' report step then stops at hospital-03's missing file, so the baselines
    # (simulations.baselines.run_baselines with kinds pooled,local, for the two sites that
    # trained) and the report (simulations.report.write_report) were made afterwards
    python docs/dashboard_screenshot.py /tmp/b <run-id> docs/dashboard.png
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from server.dashboard.command import running_dashboard  # noqa: E402
from tests.browser import chromium  # noqa: E402

WIDTH = 1400


def screenshot(*, runs: Path, run_id: str, out: Path) -> Path:
    """Save the page of ``run_id`` as a PNG at ``out``, its full height."""
    with running_dashboard(runs=runs, refresh_seconds=60) as url, chromium() as driver:
        driver.get(f"{url}runs/{run_id}")
        deadline = time.monotonic() + 60
        while driver.execute_script("return document.querySelectorAll('#figures .main-svg').length") < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("the plots were not drawn within 60 s")
            time.sleep(0.2)
        driver.execute_script("document.getElementById('live').textContent = 'live'")  # no clock time in docs
        driver.set_window_size(WIDTH, driver.execute_script("return document.body.scrollHeight") + 40)
        time.sleep(1.0)  # Plotly re-lays out its plots to the new window size
        driver.save_screenshot(str(out))
    return out


if __name__ == "__main__":
    print(screenshot(runs=Path(sys.argv[1]), run_id=sys.argv[2], out=Path(sys.argv[3])))
