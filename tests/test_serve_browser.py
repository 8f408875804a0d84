"""The web chat page (llava_jax/serve_static) in headless Chromium, used as a person would use it, against
the real `python -m llava_jax.serve` on a tiny model: attach an image, ask, watch the answer stream in, regenerate,
ask again (the history goes with the question), clear, stop; drop and paste an image; a refused request shown.

The page's answers are checked against the server's own greedy answer to the same messages, fetched over plain
HTTP: what the page shows is what an API client gets. Needs Debian's `chromium` and `chromium-driver` (skipped
with that reason where they are missing) and selenium; a failing test saves a screenshot and the browser's
console next to its temporary files.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil

import httpx2 as httpx
import pytest

from tests._inference import write_image
from tests.test_serve import KEY, Server, data_url, post

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MAX_TOKENS = 8  # a short answer keeps the test quick; several tokens still show it streaming
LONG = 64  # an answer to stop: at the throttled 2 kB/s the browser would take about 6 s to receive it
ASSISTANT = "#messages .message.assistant"
WAIT = 60  # seconds for one answer in the page, far above the tiny model's

pytestmark = [
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver",
    ),
    # The server loads and compiles the tiny model (seconds), then Chromium starts.
    pytest.mark.slow(seconds=30),
    pytest.mark.same_worker("server"),  # tests/test_serve.py's server: one start for both modules
]
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium: pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402  (after the skip above)
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    """The real server on a tiny model directory, with an API key: the worker's, shared with tests/test_serve.py
    (tests/conftest.py); (the server, {image name: path})."""
    d = str(tmp_path_factory.mktemp("images"))
    images = {name: write_image(os.path.join(d, name), seed=i, size=(40 + 9 * i, 30)) for i, name in
              enumerate(["a.png", "b.png"])}
    return served, images


@pytest.fixture
def page(server, tmp_path):
    """Headless Chromium at the server's `/`."""
    url = server[0].url
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        driver.get(url + "/")
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def evidence_on_failure(driver, directory):
    """Save what the page showed, and what its console said, when the block fails."""
    try:
        yield
    except BaseException:
        shot = os.path.join(directory, "page.png")
        driver.save_screenshot(shot)
        console = "\n".join(str(entry) for entry in driver.get_log("browser"))
        print(f"screenshot: {shot}\nbrowser console:\n{console}")
        raise


def status(driver) -> tuple[str, str]:
    """The page's status line and its state (loading, ready, streaming, done, stopped, error)."""
    element = driver.find_element(By.ID, "status")
    return element.get_attribute("data-state"), element.text


def wait_for(driver, condition, what: str):
    """Wait until `condition(driver)` is true; the failure names what was awaited and the page's status."""
    try:
        WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition)
    except Exception as e:
        raise AssertionError(f"waited {WAIT} s for {what}; status: {status(driver)}") from e


def answers(driver) -> list[str]:
    """The assistant messages' texts, exactly as shown (textContent: spaces and newlines kept)."""
    script = f"return [...document.querySelectorAll('{ASSISTANT} .text')].map(e => e.textContent)"
    return driver.execute_script(script)


def wait_answers(driver, count: int):
    """Wait until the page shows `count` finished answers."""
    done = ASSISTANT + "[data-state=done]"
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == count, f"{count} finished answers")
    assert status(driver)[0] == "done", status(driver)


def set_field(driver, element_id: str, value: str):
    """Replace what the input with id `element_id` holds by `value`, typed."""
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def throttle(driver, bytes_per_second: int):
    """Limit how fast the browser receives (-1: no limit), through the DevTools protocol."""
    conditions = {"offline": False, "latency": 0, "downloadThroughput": bytes_per_second, "uploadThroughput": -1}
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", conditions)


def last_request(driver) -> dict:
    """The body of the page's last /v1/chat/completions request (the page keeps it for tests)."""
    return json.loads(driver.execute_script("return JSON.stringify(window.__llava.lastRequest)"))


def model_name(server: Server) -> str:
    """The one model the server lists."""
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    [model] = r.json()["data"]
    return model["id"]


def greedy(server: Server, messages: list, max_tokens: int = MAX_TOKENS) -> dict:
    """The server's non-streamed greedy answer to `messages`, fetched as an API client would."""
    r = post(server, {"model": model_name(server), "messages": messages, "temperature": 0,
                      "max_tokens": max_tokens, "stream": False})
    assert r.status_code == 200, r.text
    return r.json()


def image_part(path: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def hand_file(driver, path: str, target: str, events: list[str]) -> list[bool]:
    """Fire `events` ("dragover", "drop" or "paste") carrying the PNG file at `path` at the element with id
    `target`, as a file manager's drag or the clipboard would; returns, per event, whether the page took it
    (cancelled the browser's default, which for a drop is to open the file in place of the page)."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    script = """
        const [data, name, target, events] = arguments;
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        return events.map((type) => {
            const init = {bubbles: true, cancelable: true};
            const event = type === "paste" ? new ClipboardEvent(type, {...init, clipboardData: transfer})
                                           : new DragEvent(type, {...init, dataTransfer: transfer});
            return !document.getElementById(target).dispatchEvent(event);
        });
    """
    return driver.execute_script(script, data, os.path.basename(path), target, events)


def test_page_streams_regenerates_keeps_history_and_clears(server, page, tmp_path):
    server, images = server
    driver = page
    with evidence_on_failure(driver, tmp_path):
        # Without the key the model list is refused, and the page says so; with it, the server's model is offered.
        wait_for(driver, lambda d: status(d)[0] != "loading", "the model list")
        assert status(driver)[0] == "error" and "401" in status(driver)[1], status(driver)
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        wait_for(driver, lambda d: status(d)[0] == "ready", "the model list with the key")
        assert driver.find_element(By.ID, "model").get_attribute("value") == model_name(server)

        # Greedy and short; the defaults are the original demo's.
        assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0.2"
        assert driver.find_element(By.ID, "top-p").get_attribute("value") == "0.7"
        assert driver.find_element(By.ID, "max-tokens").get_attribute("value") == "512"
        set_field(driver, "temperature", "0")
        set_field(driver, "max-tokens", str(MAX_TOKENS))

        # Attach an image through the file input: its thumbnail appears.
        driver.find_element(By.ID, "image-input").send_keys(images["a.png"])
        wait_for(driver, lambda d: d.find_element(By.ID, "image-preview").is_displayed(), "the image preview")
        question = "What is in the picture?"
        driver.find_element(By.ID, "prompt").send_keys(question)
        driver.find_element(By.ID, "send").click()
        wait_answers(driver, 1)

        first = [{"role": "user", "content": [image_part(images["a.png"]), {"type": "text", "text": question}]}]
        sent = last_request(driver)
        assert sent["messages"] == first
        assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == MAX_TOKENS
        expected = greedy(server, first)
        answer = expected["choices"][0]["message"]["content"]
        # A few tokens, so that the page must have shown it growing: several deltas, each shown as it came.
        assert expected["usage"]["completion_tokens"] >= 3, expected
        assert answers(driver) == [answer]
        assert driver.execute_script("return window.__llava.chunks") >= 2
        assert not driver.find_element(By.ID, "image-preview").is_displayed()  # the image went with the turn
        assert len(driver.find_elements(By.CSS_SELECTOR, "#messages .message.user img")) == 1

        # Regenerate: the same messages again, the old answer replaced by the same greedy answer.
        driver.find_element(By.ID, "regenerate").click()
        wait_answers(driver, 1)
        assert last_request(driver)["messages"] == first
        assert answers(driver) == [answer]

        # A second question, sent with Enter (Shift+Enter is a newline in it), carries the whole history.
        follow_up = "And the colours?\nAnswer briefly."
        driver.find_element(By.ID, "prompt").send_keys("And the colours?", Keys.SHIFT, Keys.ENTER, Keys.SHIFT,
                                                      "Answer briefly.", Keys.ENTER)
        wait_answers(driver, 2)
        second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
        assert last_request(driver)["messages"] == second
        assert answers(driver) == [answer, greedy(server, second)["choices"][0]["message"]["content"]]

        # Clear: the conversation is gone from the page and from the next request.
        driver.find_element(By.ID, "clear").click()
        assert driver.find_elements(By.CSS_SELECTOR, "#messages .message") == []
        assert status(driver)[0] == "ready"
        assert driver.find_element(By.ID, "regenerate").get_attribute("disabled") is not None

        # Stop. The tiny model answers in a fraction of a second, so the browser's network is throttled to
        # 2 kB/s (a chunk is about 250 bytes; the first arrives after about 1.5 s, the last after 6): the answer
        # is cut after its first pieces, what came stays (a prefix of the whole answer), the server stays healthy.
        set_field(driver, "max-tokens", str(LONG))
        driver.execute_cdp_cmd("Network.enable", {})
        throttle(driver, 2000)
        driver.find_element(By.ID, "prompt").send_keys("Hello", Keys.ENTER)
        wait_for(driver, lambda d: answers(d) != [""], "the answer's first piece")
        # Shown while it streams, and growing.
        [early] = answers(driver)
        wait_for(driver, lambda d: len(answers(d)[0]) > len(early), "the answer to grow")
        assert driver.find_element(By.CSS_SELECTOR, ASSISTANT).get_attribute("data-state") == "streaming"
        driver.find_element(By.ID, "abort").click()
        wait_for(driver, lambda d: status(d)[0] == "stopped", "the stop")
        throttle(driver, -1)
        alone = [{"role": "user", "content": "Hello"}]
        assert last_request(driver)["messages"] == alone
        whole = greedy(server, alone, max_tokens=LONG)["choices"][0]["message"]["content"]
        [shown] = answers(driver)
        assert len(early) < len(shown) < len(whole) and whole.startswith(shown), (early, shown, whole)
        assert driver.find_element(By.CSS_SELECTOR, ASSISTANT).get_attribute("data-state") == "stopped"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_page_shows_a_refused_request_and_keeps_the_question(server, page, tmp_path):
    server, images = server
    driver = page
    with evidence_on_failure(driver, tmp_path):
        # An image dropped on the conversation is attached. Then a wrong key: the server's 401 error object is
        # shown as a message, and the question goes back to the composer (with its image) to be sent again.
        assert hand_file(driver, images["b.png"], "messages", ["dragover", "drop"]) == [True, True]
        driver.find_element(By.ID, "api-key").send_keys("not-the-key", Keys.TAB)
        set_field(driver, "max-tokens", str(MAX_TOKENS))
        wait_for(driver, lambda d: d.find_element(By.ID, "image-preview").is_displayed(), "the image preview")
        driver.find_element(By.ID, "prompt").send_keys("Describe it.", Keys.ENTER)
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message.error"), "the refusal")
        refusal = post(server, {"messages": [{"role": "user", "content": "x"}]}, key="not-the-key")
        assert refusal.status_code == 401, refusal.text
        errors = driver.find_elements(By.CSS_SELECTOR, "#messages .message.error")
        assert len(errors) == 1 and refusal.json()["error"]["message"] in errors[0].text and "401" in errors[0].text
        assert errors[0].get_attribute("role") == "alert"
        assert driver.find_elements(By.CSS_SELECTOR, "#messages .message.user, #messages .message.assistant") == []
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == "Describe it."
        assert driver.find_element(By.ID, "image-preview").is_displayed()

        # A setting out of range is refused by the page itself, naming the setting; nothing is sent.
        set_field(driver, "top-p", "1.5")
        driver.find_element(By.ID, "send").click()
        state, text = status(driver)
        assert state == "error" and "Top-p" in text, (state, text)
        assert last_request(driver)["top_p"] == 0.7  # the refused request's, not one with 1.5

        # With the right key the same question goes through, its image with it.
        set_field(driver, "top-p", "0.7")
        set_field(driver, "temperature", "0")
        api_key = driver.find_element(By.ID, "api-key")
        api_key.clear()
        api_key.send_keys(KEY, Keys.TAB)
        wait_for(driver, lambda d: status(d)[0] == "ready", "the model list with the key")
        driver.find_element(By.ID, "send").click()
        wait_answers(driver, 1)
        question = [image_part(images["b.png"]), {"type": "text", "text": "Describe it."}]
        messages = [{"role": "user", "content": question}]
        assert last_request(driver)["messages"] == messages
        assert driver.find_elements(By.CSS_SELECTOR, "#messages .message.error") == []
        assert answers(driver) == [greedy(server, messages)["choices"][0]["message"]["content"]]

        # An image pasted into the message box is attached too.
        assert hand_file(driver, images["a.png"], "prompt", ["paste"]) == [True]
        wait_for(driver, lambda d: d.find_element(By.ID, "image-preview").is_displayed(), "the pasted image")
        assert driver.find_element(By.ID, "image-thumb").get_attribute("src") == data_url(images["a.png"])
