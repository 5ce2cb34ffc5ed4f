"""The Dagster UI in a real browser: `dagster dev` on a lake prepared by the real CLI, driven by headless Chromium.

Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`; `.ci/run` installs them).
Selenium is pointed at both binaries explicitly, so it never tries to download a browser or a driver. Without them
the tests skip, unless REQUIRE_BROWSER=1 (set by `.ci/run`) makes that a failure. Screenshots go to
$POE_E2E_ARTIFACTS (default: the test's temporary directory) and their paths are printed.
"""

import os
import time
from pathlib import Path

import dagster as dg
import pytest
from e2e.processes import BIN, free_port, http_ok, start, stop, tail, wait_for

from poe_pipeline.definitions import defs

pytestmark = pytest.mark.slow
CHROMIUM = Path(os.environ.get("POE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("POE_CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--window-size=1600,1000"]
ASSET_NAMES = sorted(spec.key.to_user_string() for spec in defs.resolve_all_asset_specs())


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        message = f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (REQUIRE_BROWSER=1 makes this a failure)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("POE_E2E_ARTIFACTS") or tmp_path_factory.mktemp("e2e_artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def prepared_lake(demo_lake) -> tuple[Path, dict[str, str]]:
    """The lake `make demo` builds, as a user opens it next with `make dev`."""
    _require_browser()
    return demo_lake.root, demo_lake.env


@pytest.fixture(scope="module")
def ui(prepared_lake, tmp_path_factory) -> str:
    lake, env = prepared_lake
    port = free_port()
    log = tmp_path_factory.mktemp("dagster_dev") / "dagster-dev.log"
    process = start([str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                    env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_ok(f"{url}/server_info"), 120, "dagster dev", process=process, log=log)
        yield url
    finally:
        stop(process)
    assert "Traceback" not in tail(log, 400), tail(log, 400)


@pytest.fixture(scope="module")
def browser(ui):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _dismiss_welcome(driver) -> None:
    """The first visit shows a 'Join the Dagster community' dialog; skip it."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
        if button.is_displayed():
            button.click()


def _wait(driver, find, what: str, timeout: float = 60):
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt():
        try:
            _dismiss_welcome(driver)
            return find()
        except StaleElementReferenceException:
            return None

    return wait_for(attempt, timeout, what, interval=0.5)


def _graph_asset_names(driver) -> set[str]:
    """Names of the asset nodes rendered in the graph (detailed nodes keep it in a tooltip, minimal ones as text)."""
    from selenium.webdriver.common.by import By

    names = set()
    for node in driver.find_elements(By.CSS_SELECTOR, "foreignObject [class*='AssetNode_assetName']"):
        tooltip = node.find_elements(By.CSS_SELECTOR, "[data-tooltip]")
        names.add(tooltip[0].get_attribute("data-tooltip") if tooltip else node.get_attribute("textContent").strip())
    return names


def _click(driver, element) -> None:
    """A JavaScript click: it reaches elements outside the viewport or under the welcome dialog's fading backdrop."""
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)
    time.sleep(0.4)


def _zoom_out(driver) -> None:
    from selenium.webdriver.common.by import By

    buttons = [b for b in driver.find_elements(By.CSS_SELECTOR, "[aria-label='zoom_out']") if b.is_displayed()]
    if buttons:
        _click(driver, buttons[0])


def _expand_groups(driver) -> None:
    """Groups start collapsed in the global lineage: open each (the graph re-renders after every click)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        toggles = driver.find_elements(By.CSS_SELECTOR, "foreignObject [aria-label='unfold_more']")
        if not toggles:
            return
        try:
            _click(driver, toggles[0])
        except StaleElementReferenceException:
            pass


def test_asset_graph_shows_every_asset(browser, ui, artifacts):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui}/asset-groups")
    _wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "foreignObject"), "the asset graph")
    time.sleep(1)  # the welcome dialog of a new browser profile opens a moment after the page
    _dismiss_welcome(browser)
    for toggle in browser.find_elements(By.CSS_SELECTOR, "[aria-label='panel_show_right'], "
                                                         "[aria-label='panel_show_left']"):
        if toggle.is_displayed():  # fold the navigation and the asset tree away: more room for the graph
            _click(browser, toggle)
    # the graph renders only what is in view, and groups start collapsed: zoom out, open every group, and zoom
    # out further until every asset of the pipeline is on screen
    for _ in range(6):
        _zoom_out(browser)
    _expand_groups(browser)
    found: set[str] = set()
    for _ in range(6):
        found = _graph_asset_names(browser)
        if set(ASSET_NAMES) <= found:
            break
        _zoom_out(browser)
    assert set(ASSET_NAMES) <= found, f"missing from the asset graph: {sorted(set(ASSET_NAMES) - found)}"
    shot = artifacts / "asset-graph.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_runs_of_the_cli_show_in_the_ui(browser, ui, prepared_lake, artifacts):
    from selenium.webdriver.common.by import By

    lake, _ = prepared_lake
    with dg.DagsterInstance.from_config(str(lake / ".dagster")) as instance:
        run_ids = [r.run_id for r in instance.get_runs()]
    assert run_ids
    browser.get(f"{ui}/runs")
    shown = _wait(browser, lambda: [r for r in run_ids if browser.find_elements(
        By.XPATH, f"//a[contains(@href, '/runs/{r}')]")] == run_ids and run_ids, "every run in the runs list")
    assert shown == run_ids
    browser.save_screenshot(str(artifacts / "runs.png"))


def test_investment_report_shows_the_top_picks(browser, ui, demo_lake, artifacts):
    from selenium.webdriver.common.by import By

    if "investment_report" not in ASSET_NAMES:
        pytest.skip("investment_report is not in the asset graph yet")
    browser.get(f"{ui}/assets/investment_report")

    def top_table():
        row = browser.find_elements(By.XPATH, "//tr[td//span[normalize-space()='top_10']]")
        if not row:
            return None
        inline = row[0].find_elements(By.XPATH, ".//div[contains(@class, 'dagster-markdown')]//table")
        if inline:
            return inline[0]
        # a long table is folded behind a link that opens it in a dialog
        for link in row[0].find_elements(By.XPATH, ".//a[normalize-space()='[Show Markdown]']"):
            browser.execute_script("arguments[0].click()", link)
        shown = browser.find_elements(By.XPATH, "//div[@role='dialog']//div[contains(@class, 'dagster-markdown')]"
                                                "//table")
        return shown[0] if shown else None

    table = _wait(browser, top_table, "the investment report's top_10 metadata table")
    # textContent, not .text: Selenium's .text is "" for a cell not yet painted (a dialog still opening)
    headers = [th.get_attribute("textContent").strip() for th in table.find_elements(By.TAG_NAME, "th")]
    cells = [row.get_attribute("textContent").strip() for row in table.find_elements(By.XPATH, ".//tbody/tr")]
    assert "currency" in headers and cells
    assert len(cells) == 10 and all(any(row.startswith(c) for c in demo_lake.currencies) for row in cells), cells
    picks = browser.find_elements(By.XPATH, "//tr[td//span[normalize-space()='picks']]")
    assert picks and picks[0].text.strip()
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", table)
    shot = artifacts / "investment-report.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
