"""The page of `eclip serve` in a real headless browser (Debian's chromium through selenium):
score an uploaded photo against typed captions, search the gallery by caption and by photo.

scripts/install.sh installs chromium and chromium-driver when it runs as root; CI must run this
test (it fails there when the browser is missing), a developer machine without them skips it."""
import os
import shutil

import httpx
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,1500",
         "--host-resolver-rules=MAP rebind.test 127.0.0.1"]   # a name an attacker rebound to this machine


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        message = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message + "; scripts/install.sh should have installed them")
        pytest.skip(message)
    os.environ.setdefault("SE_OFFLINE", "true")        # selenium must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


THUMBNAILS_RENDERED = ("const imgs = [...document.querySelectorAll('#grid img')];"
                       "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"
                       " ? imgs.map(i => i.naturalWidth) : null;")


def test_page_scores_a_photo_and_searches_the_gallery(browser, live_server, real_images, tmp_path):
    from selenium.webdriver.common.by import By
    url, photo = live_server.url, real_images["astronaut"]
    captions = ["Eileen Collins, NASA astronaut", "a rocket on the launch pad", "a cup of coffee", "a cat on a sofa"]
    files = [("image", (photo.name, photo.read_bytes(), "image/jpeg"))]
    api = httpx.post(f"{url}/match", files=files, data={"caption": captions}, timeout=60).json()
    matches = api["results"][0]["matches"]
    threshold = round((matches[0]["score"] + matches[1]["score"]) / 2, 6)    # only the best one passes

    browser.get(url + "/")
    wait(browser, lambda d: "4 images and 4 captions" in d.find_element(By.ID, "gallery-line").text)
    assert "tiny.safetensors" in browser.find_element(By.ID, "model-line").text
    browser.find_element(By.ID, "match-file").send_keys(str(photo))
    browser.find_element(By.ID, "captions").send_keys("\n".join(captions))
    box = browser.find_element(By.ID, "threshold")
    box.clear()
    box.send_keys(str(threshold))
    browser.find_element(By.ID, "match-button").click()
    wait(browser, lambda d: d.find_element(By.ID, "match-results").is_displayed())
    rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in browser.find_elements(By.CSS_SELECTOR, "#match-results tbody tr")]
    assert [r[1] for r in rows] == [m["text"] for m in matches]                    # best first, as the API
    assert [r[2] for r in rows] == [f"{m['score']:.4f}" for m in matches]
    assert [r[4] for r in rows] == ["match"] + ["below"] * (len(captions) - 1)
    verdict = browser.find_element(By.ID, "match-verdict").text
    assert matches[0]["text"] in verdict and "reaches the threshold" in verdict
    assert browser.execute_script("return document.getElementById('match-preview').naturalWidth") > 0

    search = httpx.get(f"{url}/search", params={"q": "a cat on a sofa", "k": 12}, timeout=60).json()
    want = [os.path.basename(m["path"]) for m in search["results"][0]["matches"]]
    browser.find_element(By.ID, "query").send_keys("a cat on a sofa")
    browser.find_element(By.ID, "search-button").click()
    widths = wait(browser, lambda d: d.execute_script(THUMBNAILS_RENDERED))
    assert len(widths) == 4 and all(w > 0 for w in widths)
    shown = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#grid figcaption .name")]
    assert [s.split(" ")[1] for s in shown] == want
    scores = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#grid figcaption .score")]
    assert scores == [f"{m['score']:.4f}" for m in search["results"][0]["matches"]]

    browser.find_element(By.ID, "search-file").send_keys(str(real_images["rocket"]))
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#grid figcaption .name").text == "1. rocket.jpg")
    assert len(wait(browser, lambda d: d.execute_script(THUMBNAILS_RENDERED))) == 4
    assert "the photo rocket.jpg" in browser.find_element(By.ID, "search-note").text

    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors


def test_page_shows_an_api_error(browser, live_server, tmp_path):
    """A file that is not an image: the server's one-line reason appears on the page."""
    from selenium.webdriver.common.by import By
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not pixels")
    browser.get(live_server.url + "/")
    browser.find_element(By.ID, "match-file").send_keys(str(bogus))
    browser.find_element(By.ID, "captions").send_keys("a caption")
    browser.find_element(By.ID, "match-button").click()
    wait(browser, lambda d: d.find_element(By.ID, "match-error").is_displayed())
    assert browser.find_element(By.ID, "match-error").text == "notes.jpg: not an image"


def test_a_page_on_a_name_rebound_to_127_0_0_1_reads_nothing(browser, live_server):
    """DNS rebinding: a site's name (rebind.test here) that its owner points at 127.0.0.1 makes
    the browser treat the server as that site's own origin; the server refuses that Host name, so
    the site's page can neither load the page nor read /search (paths and sha256 of the gallery)."""
    from selenium.webdriver.common.by import By
    port = live_server.url.rsplit(":", 1)[1]
    browser.get(f"http://rebind.test:{port}/")
    assert "does not answer to that Host name" in browser.find_element(By.TAG_NAME, "body").text
    status, text = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/search?q=a+cat').then(r => r.text().then(t => done([r.status, t])), e => done([0, String(e)]));")
    assert status == 403 and ".jpg" not in text and "sha256" not in text, (status, text[:300])
    browser.get_log("browser")      # the refusals above are the browser's console errors
