"""The live dashboard in a real browser: Debian's headless Chromium, driven through
chromedriver by selenium, loads the page during a running federation, waits until the
round shown on screen advances and a committed round appears in the table, and saves a
screenshot (test-artifacts/dashboard.png in the repo, for a person to look at).

Skips, saying why, where no browser is installed (`make test` installs one:
scripts/install-browser.sh)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, coordinator_config, school_config, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="no chromium/chromedriver: run scripts/install-browser.sh (make test does)")


def open_browser(tmp: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1400,1300", f"--user-data-dir={tmp / 'chromium-profile'}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def watch_page(url: str, tmp: Path, stop_after_s: float = 150.0) -> dict[str, object]:
    """In a thread: load the page and record what the screen says until the round advanced."""
    from selenium.webdriver.common.by import By

    driver = open_browser(tmp)
    try:
        driver.set_page_load_timeout(30)
        driver.get(url)
        rounds_seen: list[str] = []
        committed_rows: list[str] = []
        end = time.monotonic() + stop_after_s
        while time.monotonic() < end:
            # one script reads the screen at once: the page rebuilds its rows on every update
            shown, committed_rows = driver.execute_script(
                "return [document.getElementById('round').textContent,"
                " [...document.querySelectorAll('#rounds tr')].filter(r => r.textContent.includes('committed'))"
                ".map(r => r.dataset.round)];")
            if shown and shown != "–" and (not rounds_seen or rounds_seen[-1] != shown):
                rounds_seen.append(shown)
            if len({int(r) for r in rounds_seen}) >= 2 and committed_rows:
                break
            time.sleep(0.2)
        time.sleep(1.5)   # let the charts draw the newest point
        shot = tmp / "dashboard.png"
        driver.save_screenshot(str(shot))
        return {"rounds_seen": rounds_seen, "committed_rows": committed_rows, "screenshot": shot,
                "schools": driver.find_element(By.ID, "schools").text, "connected": driver.find_element(By.ID, "conn").text,
                "charts": len(driver.find_elements(By.CSS_SELECTOR, "#chart-acc svg circle")),
                "settings": driver.find_element(By.ID, "settings").text}
    finally:
        driver.quit()


async def test_the_dashboard_shows_the_federation_advancing_in_a_browser(tmp_path, tiny_model, fed_data,
                                                                        start_coordinator, start_school):
    cfg = coordinator_config(tmp_path, tiny_model, eval_file=fed_data / "eval" / "eval.jsonl",
                             monitor=dict(metrics_listen="", dashboard_listen="127.0.0.1:0"),
                             rounds=dict(total=4, min_schools=3, quorum=2, deadline_s=120.0),
                             train=dict(local_steps=6))
    rc = await start_coordinator(cfg)
    url = (await rc.coord.start_monitor()).urls()["dashboard"]
    for sid in ("school-1", "school-2", "school-3"):
        await start_school(school_config(tmp_path, rc.address, sid, fed_data, tiny_model))
    await wait_for(lambda: rc.engine.current is not None, 120, "the first round to open")
    seen = await asyncio.to_thread(watch_page, url, tmp_path)
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(seen["screenshot"], artifacts / "dashboard.png")   # type: ignore[arg-type]

    numbers = [int(r) for r in seen["rounds_seen"]]  # type: ignore[union-attr]
    assert len(set(numbers)) >= 2 and numbers == sorted(numbers), f"the round on screen did not advance: {seen}"
    assert seen["committed_rows"], seen
    assert all(f"school-{k}" in seen["schools"] for k in (1, 2, 3)), seen["schools"]   # type: ignore[operator]
    assert "live" in seen["connected"], seen   # type: ignore[operator]
    assert "fedavg" in seen["settings"], seen   # type: ignore[operator]
    assert seen["charts"] >= 1, "no accuracy points plotted"   # type: ignore[operator]
    from PIL import Image

    with Image.open(seen["screenshot"]) as img:  # type: ignore[arg-type]
        assert img.size[0] >= 1000 and len(img.getcolors(1 << 20) or []) > 20   # a rendered page, not a blank one
