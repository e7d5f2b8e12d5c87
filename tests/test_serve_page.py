"""The page of `minipeft serve` in a real browser (Debian's Chromium, headless, driven by Selenium through the
system's chromedriver): it asks a question and shows the streamed answer the API gives; it trains the fox on
the server, draws the loss as it falls, and the new adapter joins the list and denies the fox beside the base.

Screenshots go to $SCREENSHOTS when set (the closing notes' pictures), else to the test's temporary folder."""

import os
import shutil
import threading
from pathlib import Path

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from minipeft.cli import build_parser
from minipeft.serve import start


@pytest.fixture(scope="module")
def server(default_weights):
    server, engine = start(build_parser().parse_args(["serve", "--weights", str(default_weights), "--port", "0",
                                                      "--quiet"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    decoding = threading.Thread(target=engine.run, daemon=True)  # off the main thread: slower, the same answers
    decoding.start()
    yield server
    server.shutdown()
    engine.stop()
    decoding.join(timeout=60)


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "the page's test needs Debian's chromium and chromium-driver: run `make browser`"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def answers(browser) -> dict:
    return {card.get_attribute("data-model"): card.find_element(By.CLASS_NAME, "text").text
            for card in browser.find_elements(By.CSS_SELECTOR, "#answers .answer")}


def ask_and_wait(browser, cards: int):
    browser.find_element(By.ID, "ask").click()
    WebDriverWait(browser, 120).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, "#answers .answer.done")) == cards)
    return answers(browser)


def test_the_page_asks_trains_the_fox_and_compares(server, browser, default_weights, tmp_path):
    shots = Path(os.environ.get("SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    host, port = server.server_address[:2]
    base = default_weights.name
    browser.get(f"http://{host}:{port}/")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#models input"))

    # 1. ask: the bare base answers the chat question, streamed, as the API answers it
    shown = ask_and_wait(browser, 1)
    api = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="-").chat.completions.create(
        model=base, messages=[{"role": "user", "content": "How is cheese made?"}], max_tokens=48, temperature=0)
    assert shown == {base: api.choices[0].message.content.strip()}  # .text: the browser trims the edges
    browser.save_screenshot(str(shots / "serve-ask.png"))

    # 2. tune: the fox, with its default method (16 learned prompts), 20 steps on the server; the chart draws
    # each step's loss
    Select(browser.find_element(By.ID, "task")).select_by_value("fox")
    assert Select(browser.find_element(By.ID, "method")).first_selected_option.text == "prompt"
    for field, value in (("steps", "20"), ("name", "fox")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "train").click()
    WebDriverWait(browser, 300).until(lambda b: "joined the list" in b.find_element(By.ID, "train-status").text)
    status = browser.find_element(By.ID, "train-status").text
    assert "step 20 of 20" in status and "base unchanged: true" in status
    points = browser.find_element(By.CSS_SELECTOR, "#loss-chart polyline").get_attribute("points").split()
    assert len(points) == 20
    heights = [float(p.split(",")[1]) for p in points]
    assert heights[-1] > heights[0]  # SVG y grows downward: the loss fell
    checked = [box.get_attribute("value") for box in browser.find_elements(By.CSS_SELECTOR, "#models input")
               if box.is_selected()]
    assert checked == [base, "fox"]  # the new adapter joined, chosen beside the base
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "A quick brown fox"

    # 3. compare: the same prompt, the base and the fox side by side
    shown = ask_and_wait(browser, 2)
    assert shown["fox"].strip().startswith("did not jump over the lazy dog")
    assert not shown[base].strip().startswith("did not jump")
    browser.save_screenshot(str(shots / "serve-fox.png"))


def test_the_page_asks_for_the_api_key_once_and_sends_it(browser, default_weights, tmp_path):
    """On a server started with --api-key, the page's first call is refused (401); the page asks for the key,
    and every call after, streamed answers included, carries it."""
    from selenium.webdriver.support import expected_conditions

    from tests.helpers import tiny_with_tokenizer

    weights = tiny_with_tokenizer(tmp_path / "tiny", default_weights)
    server, engine = start(build_parser().parse_args(["serve", "--weights", str(weights), "--port", "0", "--quiet",
                                                      "--api-key", "sk-page-test-1234"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    decoding = threading.Thread(target=engine.run, daemon=True)
    decoding.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        WebDriverWait(browser, 30).until(expected_conditions.alert_is_present())
        alert = browser.switch_to.alert
        assert "API key" in alert.text
        alert.send_keys("sk-page-test-1234")
        alert.accept()
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#models input"))
        browser.find_element(By.ID, "prompt").clear()
        browser.find_element(By.ID, "prompt").send_keys("Hello")
        Select(browser.find_element(By.ID, "mode")).select_by_value("text")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("4")
        answer = ask_and_wait(browser, 1)[weights.name]
        assert answer and "API key" not in answer and "error" not in browser.find_element(
            By.CSS_SELECTOR, "#answers .answer").get_attribute("class")
    finally:
        server.shutdown()
        engine.stop()
        decoding.join(timeout=60)
