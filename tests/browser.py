"""A real headless Chromium for page tests: Debian's ``chromium`` driven through its ``chromium-driver`` (Selenium).

When the browser is missing, :func:`ensure_chromium` installs both Debian
packages if it can (root with apt-get, as on CI, whose ``.ci/run`` also
installs them up front). Only where nothing can install them is the test
skipped, with the reason; under CI (``CI`` set) a missing browser fails instead.
The browser gets no route off this machine (every host name but loopback fails
to resolve) and Chromium's own background traffic is switched off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PACKAGES = ("chromium", "chromium-driver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
         "--disable-default-apps", "--disable-extensions", "--window-size=1400,1000",
         # nothing but loopback resolves: a page that tried to load from elsewhere could not, and the
         # request log below would still show the attempt
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost")


def ensure_chromium() -> None:
    """Make sure Chromium and its driver are installed (see the module docstring)."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=False, env=env)
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    reason = (f"no headless browser: {CHROMIUM} and {CHROMEDRIVER} are missing and could not be installed "
              f"(as root: apt-get install {' '.join(PACKAGES)})")
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (Selenium WebDriver) that records every network request of its pages."""
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser's pages asked for since the last call (Chrome DevTools network events)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
