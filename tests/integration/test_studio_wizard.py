"""The studio's page as a user works it, in a real headless Chromium driven by Playwright with clicks and typing
only: the wizard from the task to a launched run (a chat file uploaded and picked from the list, the data as the
model sees it, a preview), the run's chart moving, Stop, Resume, the finished run served and asked; a bad value's
error beside its field and beside the button pressed, inside the viewport; the Advanced settings filtered.

Each step's screenshot goes to $STUDIO_SCREENSHOTS when it is set (docs/images/studio holds the committed ones:
`STUDIO_SCREENSHOTS=docs/images/studio pytest tests/integration/test_studio_wizard.py`), else to a temporary folder.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import expect, sync_playwright  # the dev extra; it drives the system's Chromium

from support.studio import Studio, chromium

expect.set_options(timeout=30_000)  # two busy CPU cores: a composition can take seconds

WORDS = ["cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "moon", "star", "rain", "leaf"]
STEPS = 1000  # 18 ms a step on a CPU: 30 steps end in half a second, before a click on Stop could land


def chat_records(n: int = 40) -> str:
    rng = random.Random(1)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("wizard")
    (home / "mine").mkdir()
    (home / "mine" / "chat.jsonl").write_text(chat_records())
    return home


@pytest.fixture(scope="module")
def studio(home):
    with Studio(home) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, studio):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(studio.url)
    expect(page.locator("#step-task")).to_be_visible()
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return lambda page, name: page.screenshot(path=str(folder / f"{name}.png"))


def step_number(page) -> int:
    return int(re.match(r"step (\d+)", page.locator("#run-step").inner_text()).group(1))


def train_points(page) -> int:
    """Points of the chart's training loss line."""
    return len(page.locator("#chart polyline").first.get_attribute("points").split())


def test_the_wizard_from_task_to_an_answer(page, studio, home, tmp_path, shots):
    # 1 task: chat, said in words
    chat = page.locator("label.choice", has_text="Chat").first
    expect(chat).to_contain_text("assistant")
    chat.click()
    shots(page, "01-task")
    page.get_by_role("button", name="Next: Model", exact=True).click()

    # 2 model: the project's models, described by their YAML; the bundled tiny one is chosen
    expect(page.locator("#step-model")).to_be_visible()
    expect(page.locator("label.choice", has_text="tiny")).to_contain_text("trains on CPU")
    expect(page.locator('input[data-group="model"][value="tiny"]')).to_be_checked()
    shots(page, "02-model")
    page.get_by_role("button", name="Next: Data", exact=True).click()

    # 3 data: a local file, uploaded, then the one already under the root picked from the list
    expect(page.locator("#step-data")).to_be_visible()
    page.locator("label.choice", has_text="Your own files").click()
    upload = tmp_path / "chat upload.jsonl"
    upload.write_text(chat_records(12))
    page.locator("#upload-file").set_input_files(str(upload))
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator("#msg-data")).to_have_text("uploaded: data/chat-upload.jsonl")
    expect(page.locator("#f-data\\.path")).to_have_value("data/chat-upload.jsonl")
    assert (home / "data" / "chat-upload.jsonl").read_text() == upload.read_text()
    page.locator("#f-data\\.path").select_option("mine/chat.jsonl")
    page.locator("#f-data\\.val_split").fill("0.1")
    page.get_by_role("button", name="Show data", exact=True).click()
    view = page.locator("#data-view")
    expect(view).to_contain_text("format messages", timeout=180_000)
    expect(view).to_contain_text("fields messages")
    expect(view).to_contain_text("train 36")
    expect(view).to_contain_text("validation 4")
    first = view.locator(".sample").first
    expect(first.locator("pre")).to_contain_text('"role": "user"')
    assert first.locator(".tok.masked").count() > 0 and first.locator(".tok.target").count() > 0
    shots(page, "03-data")
    page.get_by_role("button", name="Next: Settings", exact=True).click()

    # 4 settings: a short context and a few steps, so that the run on CPU is quick
    expect(page.locator("#step-settings")).to_be_visible()
    page.locator("#f-train\\.seq_len").fill("64")
    page.get_by_label("a number of steps").check()
    page.locator("#f-train\\.max_steps").fill(str(STEPS))
    page.locator("#f-lora\\.r").fill("4")
    page.locator("#f-train\\.micro_batch_size").fill("2")
    expect(page.locator("#g-quant")).not_to_be_checked()
    shots(page, "04-settings")
    page.get_by_role("button", name="Next: Resources", exact=True).click()

    # 5 resources: as composed (one process on this CPU)
    expect(page.locator("#step-resources")).to_be_visible()
    expect(page.locator("#g-distributed")).to_have_value("ddp")
    shots(page, "05-resources")
    page.get_by_role("button", name="Next: Preview & launch", exact=True).click()

    # 6 preview, then launch
    expect(page.locator("#step-launch")).to_be_visible()
    page.get_by_role("button", name="Preview", exact=True).click()
    plan = page.locator("#preview .plan")
    expect(plan).to_contain_text(f"total steps {STEPS}", timeout=180_000)
    expect(plan).to_contain_text("memory per GPU")
    # the time section: the run's tokens and FLOPs; on this CPU no duration, and the reason in the estimate line
    expect(plan).to_contain_text("time (estimate)")
    expect(plan).to_contain_text(f"{STEPS} steps x ")
    expect(page.locator("#estimate")).to_contain_text("time: not estimated on the CPU")
    command = page.locator("#cmd").inner_text()
    assert "data.path=mine/chat.jsonl" in command and f"train.max_steps={STEPS}" in command
    assert "data.format=messages" in command and "lora.r=4" in command
    shots(page, "06-preview")
    page.get_by_role("button", name="Launch", exact=True).click()

    # the run view, once the launcher's checks pass and it holds the run (the studio watches for up to 180 s: on
    # two cores busy with other launches that took over the 30 s of a plain expect in CI): the chart moves, Stop,
    # Resume, finished
    expect(page.locator("#step-runs")).to_be_visible(timeout=180_000)
    expect(page.locator("#run-step")).to_contain_text(re.compile(r"step [1-9]"), timeout=180_000)
    seen, points = step_number(page), train_points(page)
    expect(page.locator("#run-step")).not_to_have_text(re.compile(rf"step {seen} "), timeout=60_000)
    assert step_number(page) > seen and train_points(page) > points
    page.get_by_role("button", name="Stop (checkpoint)", exact=True).click()
    expect(page.locator("#run-msg")).to_contain_text("SIGTERM")
    expect(page.locator("#run-status")).to_have_text("preempted", timeout=120_000)
    stopped = step_number(page)
    assert 0 < stopped < STEPS
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(page.locator("#run-status")).to_have_text("resuming")  # not the old step's numbers as if running
    expect(page.locator("#run-stats")).to_contain_text("ETA —")
    expect(page.locator("#run-msg")).to_contain_text("launched", timeout=180_000)
    status = page.locator("#run-status").inner_text()  # the resumed launch holds the run: still no stale ETA
    assert status == "resuming" or step_number(page) > stopped, (status, page.locator("#run-stats").inner_text())
    expect(page.locator("#run-status")).to_have_text("finished", timeout=240_000)
    expect(page.locator("#run-step")).to_have_text(re.compile(rf"step {STEPS} / {STEPS}"))
    shots(page, "07-run")

    # every launch this studio started has been waited for: none lingers <defunct>
    children = psutil.Process(studio.proc.pid).children()
    assert not [c.pid for c in children if c.status() == psutil.STATUS_ZOMBIE]

    # serve the finished run and ask it
    page.get_by_role("button", name="Serve", exact=True).click()
    expect(page.locator("#b-serve")).to_have_text(re.compile("^Serving "), timeout=300_000)
    page.locator("#prompt").fill("Reverse: cat dog sun")
    page.get_by_role("button", name="Ask", exact=True).click()
    answer = page.locator("#answer")
    expect(answer).to_be_visible(timeout=120_000)
    assert answer.inner_text().strip()
    shots(page, "08-served")


def test_a_bad_value_is_shown_beside_its_field_and_the_button(page, shots):
    page.get_by_role("button", name="4 Settings", exact=True).click()
    page.locator("#f-lora\\.r").fill("0")
    page.get_by_role("button", name="Next: Resources", exact=True).click()
    beside_field = page.locator('.field[data-field="lora.r"] .field-err')
    expect(beside_field).to_have_text("lora.r=0 must be >= 1")
    expect(beside_field).to_be_in_viewport()
    beside_button = page.locator("#msg-settings")
    expect(beside_button).to_have_text("error: lora.r=0 must be >= 1")
    expect(beside_button).to_be_in_viewport()
    expect(page.locator("#step-settings")).to_be_visible()  # the wizard stays on the step
    field, button = page.locator("#f-lora\\.r").bounding_box(), beside_field.bounding_box()
    assert 0 <= button["y"] - (field["y"] + field["height"]) < 80  # right under the input
    shots(page, "09-error")

    # from a later step: the button's line says where the field is
    page.get_by_role("button", name="6 Preview & launch", exact=True).click()
    page.get_by_role("button", name="Preview", exact=True).click()
    expect(page.locator("#msg-launch")).to_have_text("error: lora.r=0 must be >= 1 (on step 4 Settings)")
    expect(page.locator("#msg-launch")).to_be_in_viewport()
    page.get_by_role("button", name="4 Settings", exact=True).click()
    expect(beside_field).to_be_visible()
    page.locator("#f-lora\\.r").fill("4")
    page.get_by_role("button", name="Next: Resources", exact=True).click()
    expect(page.locator("#step-resources")).to_be_visible()
    expect(beside_field).to_have_count(0)

    # a key under Advanced: its section opens and the error stands beside it
    page.locator("details#advanced > summary").click()
    page.get_by_placeholder("filter: a key or a word of its help").fill("keep")
    page.locator("#f-checkpoint\\.keep_last").fill("0")
    page.locator("details#advanced > summary").click()  # closed again: the error opens it
    page.get_by_role("button", name="Next: Preview & launch", exact=True).click()
    advanced_error = page.locator('.field[data-field="checkpoint.keep_last"] .field-err')
    expect(advanced_error).to_have_text("checkpoint.keep_last=0 must be >= 1")
    expect(advanced_error).to_be_in_viewport()
    expect(page.locator("#msg-resources")).to_have_text("error: checkpoint.keep_last=0 must be >= 1")

    # the data step: a local source without a file says so at the file list
    page.get_by_role("button", name="3 Data", exact=True).click()
    page.locator("label.choice", has_text="Your own files").click()
    page.get_by_role("button", name="Next: Settings", exact=True).click()
    expect(page.locator('.field[data-field="data.path"] .field-err')).to_contain_text("choose a file from the list")
    expect(page.locator("#msg-data")).to_be_in_viewport()


def test_advanced_holds_every_other_key_with_its_help_and_filters(page, shots):
    advanced = page.locator("details#advanced")
    expect(page.locator("details#advanced > summary")).to_contain_text("Advanced: every other setting")
    expect(advanced.locator('.field[data-field="checkpoint.keep_last"]')).to_be_hidden()  # collapsed
    page.locator("details#advanced > summary").click()
    page.get_by_placeholder("filter: a key or a word of its help").fill("keep_last")
    row = advanced.locator('.field[data-field="checkpoint.keep_last"]')
    expect(row).to_be_visible()
    expect(row).to_contain_text("newest complete checkpoints kept")  # conf/config.yaml's comment
    expect(advanced.locator('.field[data-field="lora.dropout"]')).to_be_hidden()
    page.get_by_placeholder("filter: a key or a word of its help").fill("target_modules")
    expect(advanced.locator('.field[data-field="lora.target_modules"]')).to_contain_text(
        "PEFT matches a name's last parts"
    )  # conf/schema.py's comment
    expect(advanced.locator('.field[data-field="lora.dropout"]')).to_be_hidden()  # its section shown, not its row
    assert advanced.locator('.field[data-field="lora.r"]').count() == 0  # asked on its step, not here
    advanced.locator('.field[data-field="lora.target_modules"]').scroll_into_view_if_needed()
    shots(page, "10-advanced")


def test_a_launch_that_ends_is_reaped_not_left_defunct(tmp_path, monkeypatch):
    """The studio's own process: a launch watched until it runs, then ending on its own while the studio goes on."""
    import sys
    import time

    from lora_launch.studio import jobs

    monkeypatch.setattr(jobs, "cli_argv", lambda args: [sys.executable, "-c", "import time; time.sleep(0.5)"])
    monkeypatch.setattr(jobs, "launcher_pid", lambda run_dir: started[0] if started else None)
    started = []
    real_popen = jobs.subprocess.Popen

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc.pid)
        return proc

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    assert jobs.Launches(tmp_path).start(tmp_path / "runs" / "x", ["lora.r=4"])["state"] == "running"
    deadline = time.monotonic() + 10
    while psutil.pid_exists(started[0]) and time.monotonic() < deadline:  # a <defunct> child's pid exists
        time.sleep(0.1)
    assert not psutil.pid_exists(started[0])
