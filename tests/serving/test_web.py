"""The page at `/` in a real browser: Debian's chromium, driven by Selenium through Debian's chromedriver,
against a real `featurecache serve` process with a token. Files go in through the page's own file input;
the labels the page shows must be what `POST /predict` answers for the same files. Its screenshot goes
under the test's temporary folder, or to FEATURECACHE_SCREENSHOT when set: scripts/refresh_screenshot.py
sets it to docs/serve-page.png, so the tracked picture changes only when someone asks, and shows a page
this test has just checked.

Skipped only where chromium, chromedriver or selenium is absent (with the reason); `.ci/run` installs
them and sets FEATURECACHE_REQUIRE_BROWSER=1, under which their absence fails the test instead.
"""

import json
import os
from pathlib import Path

import httpx
import pytest

from conftest import feats, fit_run, require, serving, write_digit_folder

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "page-test-token"
# What headless Chromium needs on these machines: no sandbox (root), no GPU, and none of the background
# connections a closed network refuses by the dozen (../shared/OFFLINE_ASSETS.md).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage", "--window-size=1280,1180"]


def browser_or_skip():
    missing = [p for p in (CHROMIUM, DRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    require(not missing, f"no real browser here: {', '.join(missing)} missing (apt-get install chromium "
            "chromium-driver; pip install -e '.[test]')", under="FEATURECACHE_REQUIRE_BROWSER")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A logreg on real pretrained codes (HED-VGG16 block3_pool of ten digit classes), behind a token."""
    browser_or_skip()  # no server for a test that will not run
    root = tmp_path_factory.mktemp("page")
    data, new, cache = root / "digits", root / "new", root / "cache"
    write_digit_folder(data, 8, classes=range(10))
    new_files = write_digit_folder(new, 1, classes=range(10), offset=8)
    run_id = fit_run("--data", data, *feats(32, "block3_pool", weights="hed-bsds"), "--head", "logreg", "--extract",
                     cache=cache)["run_id"]
    with serving(["--run", run_id, "--token", TOKEN], cache, root / "server.log") as url:
        yield {"url": url, "run": run_id, "data": data, "new": new_files, "cache": cache, "root": root}


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def shown(driver, element_id) -> bool:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).get_attribute("hidden") is None


def cards(driver) -> dict:
    """file name -> what its card shows: state, top labels, scores, error, time line."""
    from selenium.webdriver.common.by import By

    out = {}
    for card in driver.find_elements(By.CSS_SELECTOR, "#results .card"):
        rows = card.find_elements(By.CSS_SELECTOR, "ol li")
        out[card.get_attribute("data-file")] = {
            "state": card.get_attribute("data-state"),
            "labels": [r.find_element(By.CLASS_NAME, "label").text for r in rows],
            "scores": [float(r.find_element(By.CLASS_NAME, "score").text) for r in rows],
            "error": card.find_element(By.CLASS_NAME, "error").text,
            "meta": card.find_element(By.CLASS_NAME, "meta").text}
    return out


def upload(driver, paths, total):
    """Choose `paths` in the page's own file input; wait until `total` cards have an answer."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))
    wait(driver, lambda d: len(c := cards(d)) == total and all(v["state"] != "pending" for v in c.values()))
    return cards(driver)


def predict(server, paths, top=3):
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = httpx.post(f"{server['url']}/predict", params={"top": top}, files=files,
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    return r


def test_the_page_asks_for_the_token_then_labels_uploads_as_predict_does(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{server['url']}/")
    wait(browser, lambda d: shown(d, "token-box"))  # /runs said 401: the page asks, and shows nothing else
    assert not shown(browser, "upload-box") and not shown(browser, "run-box")
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.ID, "token-submit").click()
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "token-error").text)
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "token-submit").click()
    wait(browser, lambda d: shown(d, "upload-box") and d.find_elements(By.CSS_SELECTOR, "table.confusion"))
    # Kept for the tab only: in sessionStorage, nothing in localStorage or cookies.
    assert browser.execute_script("return sessionStorage.getItem('featurecache-token')") == TOKEN
    assert browser.execute_script("return localStorage.length") == 0 and browser.get_cookies() == []

    record = json.loads((server["cache"] / "runs" / server["run"] / "run.json").read_text())
    facts = browser.find_element(By.ID, "run-info").text
    assert server["run"] in facts and record["features"] in facts
    from featurecache.runs import record as runs

    run = runs.load(server["cache"], server["run"])
    # The run's every setting, as `report` says it, but the data by its name: never the server's folders.
    assert run.describe().replace(str(run.data), Path(run.data).name) in facts
    assert str(server["data"]) not in facts
    assert f"{100 * record['metrics']['test_accuracy']:.2f}%" in facts
    table = browser.find_element(By.CSS_SELECTOR, "table.confusion")
    assert len(table.find_elements(By.TAG_NAME, "tr")) == 1 + len(record["class_names"])

    # Two images: one the cache holds (a training image), one it does not.
    paths = [sorted((server["data"] / "digit3").iterdir())[0], server["new"][7]]
    shown_cards = upload(browser, paths, total=2)
    want = predict(server, paths).json()["predictions"]
    for path, answer in zip(paths, want):
        card = shown_cards[path.name]
        assert card["state"] == "done" and card["error"] == ""
        assert card["labels"] == [t["label"] for t in answer["top"]]
        assert card["scores"] == pytest.approx([t["score"] for t in answer["top"]], abs=6e-4)  # shown to 3 places
        assert card["meta"].split()[1] == "ms"  # the time taken
    assert "from the cache" in shown_cards[paths[0].name]["meta"]


def test_a_non_image_gets_the_servers_error_next_to_it_and_the_others_still_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "clear").click()
    notes = server["root"] / "notes.png"
    notes.write_text("these are notes, not a picture\n")
    paths = [server["new"][2], notes, server["new"][5]]
    shown_cards = upload(browser, paths, total=3)
    bad = predict(server, [notes])
    assert bad.status_code == 422
    assert shown_cards["notes.png"]["state"] == "error"
    assert shown_cards["notes.png"]["error"] == bad.json()["error"]  # the server's own line, as is
    want = {p.name: r["label"] for p, r in zip(paths[::2], predict(server, paths[::2]).json()["predictions"])}
    assert {name: shown_cards[name]["labels"][0] for name in want} == want
    assert all(shown_cards[name]["state"] == "done" for name in want)

    # The screenshot: the run, its confusion matrix, two labelled digits and the refused file. Never into the
    # tracked docs/ unless asked (scripts/refresh_screenshot.py).
    screenshot = Path(os.environ.get("FEATURECACHE_SCREENSHOT") or tmp_path / "serve-page.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
