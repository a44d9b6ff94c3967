"""src.app, the Gradio demo, on the tiny twin (random-init weights, CPU): its handlers called directly (every
turn gives what `src.generate` gives for the same turns and seed, history carries on, bad input is an error
toast), and (slow tier) the real page driven by headless Chromium through selenium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from src.generate import generate
from src.pipelines.conversation import Conversation, ConversationRunner
from src.pipelines.detok import SamplingOptions
from src.pipelines.mllm import DecodingOptions, Generated
from tests.helpers import FAST_GENERATE, tiny_generate_cfg

pytestmark = pytest.mark.smoke

from src.app import DemoApp, DemoModels, reply_messages  # first: it turns Gradio's analytics off  # isort: skip

import gradio as gr  # isort: skip

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "assets" / "sample" / "images"
FAST = FAST_GENERATE


def app_cfg(out: Path, overrides=()):
    return tiny_generate_cfg(out, overrides, config_name="app")


def generated(out: Path, overrides) -> dict:
    """What `python -m src.generate` answers (the first request's result)."""
    return generate(tiny_generate_cfg(out, overrides))[0]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    out = tmp_path_factory.mktemp("app")
    return DemoApp(DemoModels(app_cfg(out)), out)


def turn_result(app: DemoApp, state: dict, k: int) -> dict:
    return json.loads((app.work / "sessions" / state["session"] / f"turn_{k}" / "results.jsonl").read_text())


def test_the_page_wires_send_and_clear_to_the_handlers(app):
    with app.blocks() as page:
        fns = [f.fn for f in page.fns.values()]
    assert fns.count(app.send) == 2 and app.clear in fns  # the Send button and Enter in the message box
    chat, state, shown, text, image = app.clear()
    assert chat == [] and state["turns"] == [] and state["n"] == 0 and shown is None and text == "" and image is None


def test_t2i_draws_what_src_generate_draws_for_the_same_seed(app, tmp_path):
    chat, state, shown, text, image = app.send("t2i", "a red apple", None, 7, None, None)
    assert chat[0] == {"role": "user", "content": "a red apple"} and chat[-1] == {"role": "assistant",
                                                                                   "content": {"path": shown}}
    assert text == "" and image is None  # the inputs clear for the next turn
    drawn = Image.open(shown)
    assert drawn.format == "PNG" and drawn.size == (32, 32)
    want = generated(tmp_path / "g", ["mode=t2i", "prompt=a red apple", "seed=7"])
    assert turn_result(app, state, 0)["replies"][0]["raw"] == want["replies"][0]["raw"]
    assert drawn.tobytes() == Image.open(want["replies"][0]["images"][0]).tobytes()
    # the seed box decides the image: the same seed again (a new conversation) draws it again, another does not
    again = app.send("t2i", "a red apple", None, 7, None, None)[2]
    other = app.send("t2i", "a red apple", None, 8, None, None)[2]
    assert Image.open(again).tobytes() == drawn.tobytes() != Image.open(other).tobytes()


def test_chat_history_carries_to_the_next_turn_as_src_generate_would(app, tmp_path):
    chat, state, shown, _, _ = app.send("chat", "What animal is this?", str(IMAGES / "chelsea.jpg"), 3, [], None)
    first = turn_result(app, state, 0)
    reply = first["replies"][0]["text"]
    assert reply and chat[-1] == {"role": "assistant", "content": reply}
    assert chat[0]["content"]["path"].endswith("input.jpg") and chat[1]["content"] == "What animal is this?"
    assert not isinstance(shown, str)  # nothing drawn: the image panel keeps what it showed
    assert [t["role"] for t in state["turns"]] == ["user", "assistant"] and state["n"] == 1

    chat2, state2, *_ = app.send("chat", "And its colour?", None, 3, chat, state)
    assert chat2[:len(chat)] == chat and chat2[len(chat)]["content"] == "And its colour?"
    request = app.work / "sessions" / state["session"] / "turn_1" / "request.jsonl"
    sent = json.loads(request.read_text())
    assert sent["turns"][:2] == state["turns"] and sent["turns"][2]["content"] == [{"text": "And its colour?"}]
    assert [t["role"] for t in state2["turns"]][:3] == ["user", "assistant", "user"] and state2["n"] == 2
    # the whole two-turn conversation, answered by src.generate from the request file, gives the same reply
    want = generated(tmp_path / "g", ["mode=chat", f"requests={request}", "seed=3"])
    assert turn_result(app, state2, 1)["replies"][0]["raw"] == want["replies"][0]["raw"]


def test_instruct_format_words_only_the_new_turn(tmp_path):
    """SEED-X-I wording (`Generate an image: ...`) for the t2i turn; the earlier turns stay as the model saw them."""
    app = DemoApp(DemoModels(app_cfg(tmp_path, ["generate.prompt_format=instruct"])), tmp_path)
    chat, state, *_ = app.send("t2i", "a red apple", None, 1, None, None)
    _, state, *_ = app.send("chat", "What is it?", None, 1, chat, state)
    users = [t["content"] for t in state["turns"] if t["role"] == "user"]
    assert users == [[{"text": "Generate an image: a red apple"}], [{"text": "What is it?"}]]
    # the drawn image went back into the context as the model's own span
    assert {"image": turn_result(app, state, 0)["replies"][0]["images"][0], "generate": True} in state["turns"][1][
        "content"]


def test_edit_draws_from_the_input_image_and_ground_shows_its_boxes(app, tmp_path):
    _, state, shown, *_ = app.send("edit", "make it grey", str(IMAGES / "chelsea.jpg"), 5, None, None)
    assert Image.open(shown).size == (32, 32) and turn_result(app, state, 0)["replies"][0]["images"] == [shown]
    want = generated(tmp_path / "g", ["mode=edit", "prompt=make it grey", f"image={IMAGES / 'chelsea.jpg'}", "seed=5"])
    assert Image.open(shown).tobytes() == Image.open(want["replies"][0]["images"][0]).tobytes()

    _, state, *_ = app.send("ground", "Where is the cup?", str(IMAGES / "coffee.jpg"), 5, None, None)
    assert "boxes" in turn_result(app, state, 0)["replies"][0]
    # a reply with boxes (the runner parses them as in tests/test_generate.py) shows them drawn on the input
    image = IMAGES / "coffee.jpg"
    gen = app.models.generator
    tok = gen.tokenizer
    box = [gen.ids.box_start, *gen.ids.loc[20:24], gen.ids.box_end]
    runner = ConversationRunner("ground", gen, None, lambda: None, DecodingOptions(), SamplingOptions(), tmp_path)
    conv = Conversation.of({"id": "g", "source": "t", "turns": [
        {"role": "user", "content": [{"image": str(image)}, {"text": "where?"}]}]})
    conv.next_prompt()
    runner._add_reply(conv, Generated(token_ids=tok.encode("here", add_special_tokens=False) + box, finished=True),
                      [], 0)
    messages = reply_messages(conv.replies[0])
    assert messages[-1] == {"role": "assistant", "content": {"path": conv.replies[0]["boxes_image"]}}
    assert Image.open(messages[-1]["content"]["path"]).size == Image.open(image).size


def test_bad_input_is_an_error_toast_and_the_conversation_stays(app):
    chat, state, *_ = app.send("chat", "Hello", None, 1, None, None)
    before = (list(chat), json.dumps(state))
    for args, match in [(("edit", "make it grey", None, 1), "mode=edit needs an input image"),
                        (("chat", "   ", None, 1), "type a message"),
                        (("chat", "Hello", None, "abc"), "seed must be an integer"),
                        (("tryon", "Wear it", None, 1), "'tryon' is not one of")]:
        with pytest.raises(gr.Error, match=match):
            app.send(*args, chat, state)
        assert (chat, json.dumps(state)) == before
    nxt = app.send("chat", "Again", None, 1, chat, state)[1]
    assert nxt["n"] == 2  # the failed sends used no turn


def test_config_mistakes_fail_before_any_model_is_built(tmp_path, monkeypatch):
    import src.app

    def never(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(src.app, "build_mllm", never)
    for override, match in [("app.modes=[chat,paint]", "app.modes"), ("app.modes=[recon]", "app.modes"),
                            ("app.port=70000", "app.port"), ("sampling.sampler=NoSuchScheduler", "sampler")]:
        with pytest.raises(ValueError, match=match):
            DemoModels(app_cfg(tmp_path, [override]))


# ---- the page in a real browser (slow tier) -------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, proc: subprocess.Popen, log: Path, limit_s: float = 600) -> None:
    """Until the app answers (it builds the models first); fails with its log if it exits."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"python -m src.app exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the app did not answer on {url}:\n{log.read_text()[-3000:]}")


def drive(url: str, screenshot: Path, size=(1280, 800)) -> tuple[str, str, list[str]]:
    """A user's session: a t2i prompt, then a chat question about an uploaded image. Waits for the drawn
    image and the reply, saves a screenshot; returns (the image's URL, the reply text shown, every URL the
    page loaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={size[0]},{size[1]}"]:
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 300)
        message = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea"))
        driver.find_element(By.CSS_SELECTOR, "[data-testid='t2i-radio-label']").click()
        message.send_keys("a red apple on a table")
        driver.find_element(By.ID, "send").click()
        drawn = wait.until(lambda d: [im for im in d.find_elements(By.CSS_SELECTOR, "#output_image img")
                                      if d.execute_script("return arguments[0].complete && "
                                                          "arguments[0].naturalWidth > 0", im)])[0]
        src = drawn.get_attribute("src")
        driver.find_element(By.CSS_SELECTOR, "[data-testid='chat-radio-label']").click()
        driver.find_element(By.CSS_SELECTOR, "#input_image input[type=file]").send_keys(str(IMAGES / "chelsea.jpg"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input_image img"))
        message.send_keys("What animal is this?")
        driver.find_element(By.ID, "send").click()
        # the t2i turn left two bot messages (its text, its image); the question's reply is the next text one
        reply = wait.until(lambda d: [m.text for m in d.find_elements(By.CSS_SELECTOR, "#chat [data-testid='bot']")
                                      if m.text.strip()][1:])[0]
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#input_image img"))  # the turn finished
        driver.save_screenshot(str(screenshot))
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        return src, reply, [driver.current_url, *loaded]
    finally:
        driver.quit()


@pytest.mark.slow
def test_browser_sends_a_t2i_prompt_and_a_chat_question(tmp_path):
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: apt-get install -y chromium chromium-driver "
                    "(.ci/run installs them)")
    port, run, log = free_port(), tmp_path / "run", tmp_path / "app.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "src.app", "experiment=seedx_pretrain_tiny",
                                 f"app.port={port}", f"paths.output_dir={run}", *FAST],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_page(url, proc, log)
        src, reply, loaded = drive(url, tmp_path / "app.png")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert src.endswith(".png")
    # nothing from the network: every script, style sheet, font and image came from the app itself
    assert len(loaded) > 3 and all(u.startswith((f"http://127.0.0.1:{port}/", "data:", "blob:"))
                                   for u in loaded), loaded
    shot = Image.open(tmp_path / "app.png")
    assert shot.format == "PNG" and shot.width == 1280 and len(shot.convert("L").getcolors(1 << 16)) > 10
    # the page shows what the app answered: the t2i turn's image, then the chat reply
    (session,) = (run / "sessions").iterdir()
    t2i = json.loads((session / "turn_0" / "results.jsonl").read_text())["replies"][0]
    chat = json.loads((session / "turn_1" / "results.jsonl").read_text())["replies"][0]
    assert Path(src).name == Path(t2i["images"][0]).name
    assert " ".join(reply.split()) == " ".join((chat["text"] or "(no text)").split())
