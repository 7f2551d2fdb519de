"""docs/serve.png: the `eclip serve` page with the demo's EntityCLIP and the demo set's test split as the
gallery, driven by headless chromium as tests/test_serve_page.py drives it, with free-form queries
from examples/free-form-queries.jsonl. The page shows whatever the model returns.

    python examples/demo.py                      # the demo's output folder: demo-out/
    python docs/serve_screenshot.py --demo demo-out --output docs/serve.png
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUERIES = ROOT / "examples" / "free-form-queries.jsonl"
PHOTO = "eileen-collins"                                  # the photograph scored against free-form queries
MATCH = ("eileen-collins", "dscovr-falcon-9", "grace-hopper", "hubble-deep-field")
SEARCH = "flag-japan"                                     # the free-form query searched in the gallery
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1100,1500"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="demo-out", help="the demo's output folder")
    ap.add_argument("--output", default=str(ROOT / "docs" / "serve.png"))
    args = ap.parse_args(argv)
    demo = Path(args.demo)
    checkpoint = json.loads((demo / "summary.json").read_text())["train"]["EntityCLIP"]["last_checkpoint"]
    queries = {q["entity"]: q["query"] for q in map(json.loads, QUERIES.read_text().splitlines())}

    from eclip.config import ModelSpec
    from eclip.embed import embed
    from eclip.embedstore import open_store
    from eclip.match import Matcher
    from eclip.serve import Server, ServeOptions
    work = Path(tempfile.mkdtemp(prefix="eclip-shot-"))
    spec = ModelSpec(checkpoint=checkpoint, device="cpu")
    embed(spec, work / "gallery", dataset=str(demo / "data" / "test.jsonl"), dtype="fp32", workers=0)
    server = Server(Matcher.from_spec(spec), ServeOptions(port=0), open_store(work / "gallery"))
    threading.Thread(target=server.run, daemon=True).start()
    assert server.started.wait(120), "eclip serve did not start"

    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in FLAGS + [f"--user-data-dir={work / 'profile'}"]:
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        def wait(condition):
            return WebDriverWait(browser, 120, poll_frequency=0.2).until(condition)
        browser.get(server.url + "/")
        wait(lambda d: "images" in d.find_element(By.ID, "gallery-line").text)
        browser.find_element(By.ID, "match-file").send_keys(str(demo / "data" / "images" / PHOTO / "5.jpg"))
        browser.find_element(By.ID, "captions").send_keys("\n".join(queries[e] for e in MATCH))
        browser.find_element(By.ID, "match-button").click()
        wait(lambda d: d.find_element(By.ID, "match-results").is_displayed())
        browser.find_element(By.ID, "query").send_keys(queries[SEARCH])
        browser.find_element(By.ID, "search-button").click()
        wait(lambda d: d.execute_script("const i = [...document.querySelectorAll('#grid img')];"
                                        "return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0);"))
        shown = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#grid figcaption .name")][:3]
        browser.save_screenshot(args.output)
        print(f"{args.output}: search {queries[SEARCH]!r} -> {shown}")
    finally:
        browser.quit()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
