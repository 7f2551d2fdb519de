"""`eclip evaluate --report DIR` opened in a real headless browser (Debian's chromium through
selenium, as tests/test_serve_page.py): the metrics as the JSON report says, every thumbnail and
plot loaded from the folder itself, the worst queries first with the true item marked, a page of
successes, and for classification the confusion matrix and the most confused pairs. Screenshots
are kept in the test's temporary folder."""
import json

import pytest

from eclip.cli import app

from benchmark_fixtures import placeholder
from test_evaluate import runner
from test_serve_page import browser, wait  # noqa: F401  (the module-scoped chromium fixture)

IMAGES_LOADED = ("const imgs = [...document.querySelectorAll('img')];"
                 "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"
                 " ? imgs.map(i => i.getAttribute('src')) : null;")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """14 labelled records, each its own photo crop."""
    folder = tmp_path_factory.mktemp("report-data")
    rows = []
    for i in range(14):
        placeholder(folder / f"p{i}.jpg", i)
        rows.append({"id": f"q{i}", "image": f"p{i}.jpg", "text": f"caption {i} of the report test",
                     "label": ["people", "places", "things"][i % 3]})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_retrieval_report_in_the_browser(browser, pairs, checkpoint, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    report, ranks = tmp_path / "report", tmp_path / "ranks.jsonl"
    r = runner().invoke(app, ["evaluate", "--dataset", str(pairs), "--checkpoint", str(checkpoint[0]),
                              "--same-image", "none", "--json", "--report", str(report), "--dump-ranks", str(ranks)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    html = (report / "index.html").read_text()
    assert "http://" not in html and "https://" not in html          # nothing from the network

    browser.get((report / "index.html").as_uri())
    sources = wait(browser, lambda d: d.execute_script(IMAGES_LOADED))
    assert "recall.png" in sources and all(s.startswith("thumbs/") for s in sources if s != "recall.png")
    cells = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
             for tr in browser.find_elements(By.CSS_SELECTOR, "#metrics table tbody tr")]
    t2i = result["text_to_image"]
    assert cells[0] == ["text → image", f"{t2i['R@1']:.2f}", f"{t2i['R@5']:.2f}", f"{t2i['R@10']:.2f}",
                        str(t2i["median_rank"]), f"{t2i['mean_rank']:.1f}"]

    dumped = [json.loads(line) for line in ranks.read_text().splitlines()]
    failed = [d for d in dumped if d["direction"] == "text_to_image" and d["rank"] > 1]
    failed.sort(key=lambda d: -d["rank"])                           # stable: the earlier query first on a tie
    queries = browser.find_elements(By.CSS_SELECTOR, "#failures-t2i .query")
    assert len(queries) == len(failed) > 0
    for shown, want in zip(queries, failed):
        assert f"rank {want['rank']} of {result['n_images']}" in shown.find_element(By.CLASS_NAME, "text").text
        figures = shown.find_elements(By.TAG_NAME, "figure")
        names = [f.find_element(By.TAG_NAME, "figcaption").text.splitlines()[-1] for f in figures]
        assert names[:5] == ["/".join(m["id"].split("/")[-2:]) for m in want["top"][:5]]   # folder/file
        true = [f for f in figures if "true" in f.get_attribute("class").split()]
        assert len(true) == 1 and true[0].text.splitlines()[-1] == "/".join(want["positives"][0].split("/")[-2:])
    browser.save_screenshot(str(tmp_path / "retrieval-report.png"))

    browser.find_element(By.LINK_TEXT, "successes").click()
    wait(browser, lambda d: d.find_elements(By.ID, "successes-t2i"))
    wins = browser.find_elements(By.CSS_SELECTOR, "#successes-t2i .query")
    assert len(wins) == sum(d["direction"] == "text_to_image" and d["rank"] == 1 for d in dumped)
    for shown in wins:
        first = shown.find_elements(By.TAG_NAME, "figure")[0]
        assert "true" in first.get_attribute("class").split() and "rank 1 of" in shown.text
    browser.save_screenshot(str(tmp_path / "retrieval-successes.png"))
    assert (tmp_path / "retrieval-report.png").stat().st_size > 10_000


def test_classification_report_in_the_browser(browser, pairs, checkpoint, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    report = tmp_path / "report"
    r = runner().invoke(app, ["evaluate", "--task", "classify", "--dataset", str(pairs), "--checkpoint",
                              str(checkpoint[0]), "--inputs", "image+text", "--json", "--report", str(report)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    browser.get((report / "index.html").as_uri())
    sources = wait(browser, lambda d: d.execute_script(IMAGES_LOADED))
    assert "confusion.png" in sources
    assert browser.execute_script("return document.querySelector('#confusion img').naturalWidth") >= 400
    head = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#metrics td")]
    assert head[:3] == [f"{result['top1']:.2f}", "-", f"{result['mean_per_class_recall']:.2f}"]   # 3 classes: no top-5
    pairs_shown = browser.find_elements(By.CSS_SELECTOR, "#confused .query")
    assert len(pairs_shown) == len(result["confused_pairs"])
    for shown, want in zip(pairs_shown, result["confused_pairs"]):
        assert f"{want['true']} → predicted {want['predicted']}" in shown.text
        assert len(shown.find_elements(By.TAG_NAME, "img")) == len(want["examples"])
    rows = browser.find_elements(By.CSS_SELECTOR, "#per-class tbody tr")
    assert [row.find_element(By.TAG_NAME, "td").text for row in rows] == ["people", "places", "things"]
    browser.save_screenshot(str(tmp_path / "classification-report.png"))


def test_a_failed_report_leaves_no_folder(pairs, checkpoint, tmp_path, monkeypatch):
    import eclip.report

    def broken(self, path):
        raise OSError("disk full")
    monkeypatch.setattr(eclip.report.Thumbnails, "_make", broken)
    r = runner().invoke(app, ["evaluate", "--dataset", str(pairs), "--checkpoint", str(checkpoint[0]),
                              "--report", str(tmp_path / "report")])
    assert r.exit_code != 0
    assert list(tmp_path.iterdir()) == []          # neither the report nor its temporary folder


def test_table_report_links_each_cell_to_its_own_report(browser, pairs, checkpoint, tiny_config_path,  # noqa: F811
                                                        tmp_path):
    from selenium.webdriver.common.by import By
    report = tmp_path / "report"
    r = runner().invoke(app, ["evaluate", "--dataset", str(pairs), "--checkpoint", str(checkpoint[0]), "--model",
                              str(tiny_config_path), "--pretrained", "none", "--device", "cpu", "--recall-k", "1",
                              "--json", "--report", str(report)])
    assert r.exit_code == 0, r.output
    grid = json.loads(r.stdout)
    browser.get((report / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#metrics tbody tr")
    assert [row.find_element(By.TAG_NAME, "td").text for row in rows] == grid["models"]
    links = browser.find_elements(By.CSS_SELECTOR, "#metrics tbody a")
    assert len(links) == 2 and links[1].text == f"{grid['results'][1][0]['text_to_image']['R@1']:.2f}"
    browser.save_screenshot(str(tmp_path / "table-report.png"))
    links[1].click()
    sources = wait(browser, lambda d: d.execute_script(IMAGES_LOADED))
    assert "recall.png" in sources
    assert len(browser.find_elements(By.CSS_SELECTOR, "#failures-t2i .query figure")) >= 5   # top 5 shown at --recall-k 1
