"""model.serve.web in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
selenium) opens the chat page, a typed message gets a reply that streams in, the sampling controls
reach the engine, Reset forgets the conversation, and the page asks nothing of any host but ours.
A screenshot is saved when it fails."""
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
if importlib.util.find_spec("gradio") is None or importlib.util.find_spec("fastapi") is None:
    pytest.skip("the web chat needs the serve and web extras: pip install -e '.[serve,web]'", allow_module_level=True)

from model.serve import web  # noqa: E402  (first: it turns Gradio's analytics off before Gradio loads)
from model.chat_format import render_prompt  # noqa: E402
from model.io.checkpoint import load_model, load_tokenizer  # noqa: E402
from model.serve.engine import Engine  # noqa: E402
from posttrain_fixtures import make_run  # noqa: E402
from serve_fixtures import LoopbackServer  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
STEP_DELAY_S = 0.03            # per streamed piece, so that the page shows the reply growing


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"no browser: {CHROMIUM} and {CHROMEDRIVER} come with Debian's chromium and chromium-driver "
                    f"packages (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(dir=tmp_path)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def chat_server(tmp_path):
    run = make_run(tmp_path / "run", n_layer=2, init_std=0.3)
    model, _ = load_model(run)
    engine = Engine(model, load_tokenizer(run), max_batch=4)
    requests, finished = [], []
    stream = engine.stream

    def recorded(request):
        # What the page asked the engine for, and its reply slowed down enough to watch it stream.
        requests.append(request)
        for delta in stream(request):
            time.sleep(STEP_DELAY_S)
            yield delta
        finished.append(request)

    engine.stream = recorded
    server = LoopbackServer(web.web_app(engine, "tiny"))
    server.requests, server.finished, server.engine = requests, finished, engine
    yield server
    server.close()
    engine.close()


def test_chat_page_streams_a_reply_and_resets(browser, chat_server, tmp_path):
    from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    tok = chat_server.engine.tok
    shot = tmp_path / "web-chat.png"
    try:
        browser.get(chat_server.url + "/")
        # The page re-renders as replies stream: an element found a moment ago may be gone.
        wait = WebDriverWait(browser, 60, poll_frequency=0.02,
                             ignored_exceptions=[StaleElementReferenceException, ElementNotInteractableException])
        # The sampling controls: greedy from here on.
        wait.until(lambda b: b.find_element(By.XPATH, "//span[normalize-space(text())='Sampling']")).click()
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "input[type=number]"))
        for label, value in (("temperature (0: greedy)", "0"), ("max tokens", "12")):
            field = browser.find_element(By.CSS_SELECTOR, f"input[type=number][aria-label='number input for {label}']")
            field.clear()
            field.send_keys(value, Keys.TAB)

        def bot_texts():
            return [m.text for m in browser.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")]

        def say(text: str, turn: int) -> set[str]:
            """Send text; wait for reply number turn to finish on the page; -> the texts it showed."""
            # The box takes input again once the page has finished the last turn.
            wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "textarea").send_keys(text, Keys.ENTER) or True)
            seen = set()

            def replied(b) -> bool:
                texts = bot_texts()
                if len(texts) == turn and texts[-1]:
                    seen.add(texts[-1])
                return len(chat_server.finished) == len(chat_server.requests) > 0 and texts[-1:] == [max(seen, key=len, default=None)]
            wait.until(replied)
            return seen

        seen = say("What is 2 + 3?", 1)
        assert len(seen) >= 2, f"the reply did not stream: the page showed only {seen}"
        first = chat_server.requests[0]
        assert (first.temperature, first.max_tokens) == (0, 12)
        assert first.prompt == render_prompt([{"role": "user", "content": "What is 2 + 3?"}], tok)
        assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, "[data-testid='user']")] == ["What is 2 + 3?"]

        # A second turn carries the first; after Reset, the conversation starts over.
        say("And 4 + 4?", 2)
        assert len(chat_server.requests[1].prompt) > len(first.prompt) + 5
        browser.find_element(By.XPATH, "//button[normalize-space(.)='Reset']").click()
        wait.until(lambda b: not bot_texts())
        say("hello", 1)
        assert chat_server.requests[2].prompt == render_prompt([{"role": "user", "content": "hello"}], tok)
    except Exception:
        browser.save_screenshot(str(shot))
        print(f"screenshot of the failure: {shot}")
        raise

    # Everything the page loaded came from our server (or from the page itself).
    urls = {json.loads(e["message"])["message"]["params"]["request"]["url"]
            for e in browser.get_log("performance")
            if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"}
    foreign = sorted(u for u in urls if not u.startswith((chat_server.url, "data:", "blob:", "chrome:", "about:")))
    assert not foreign, foreign


def test_command_flags(capsys):
    from model.command import run_command

    with pytest.raises(SystemExit) as exit:
        run_command(lambda: web.main(["RUN", "--port", "web"]))
    assert exit.value.code == 2 and "argument --port: expected a whole number, got 'web'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        web.main(["--help"])
    assert exit.value.code == 0
    usage = capsys.readouterr().out
    assert "TCP port (default 7860)" in usage and "--quantize" in usage and "--max-batch" in usage
