"""`lora-launch studio` as a user meets it: the installed console script started from a folder holding a tiny
model and data, driven over real HTTP (the token, the form, validation, the data view, the preview against the
command line's, a launch stopped with SIGTERM and resumed, a refused second launch, the runs table, an endpoint),
the studio itself stopped while a run goes on, and the page rendered by a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from support.cli import CLI, subprocess_env
from support.studio import Studio, chromium


@pytest.fixture(scope="module")
def home(tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("studio")
    shutil.copytree(tiny["model"], home / "model")
    shutil.copy(tiny["data"], home / "data.jsonl")
    return home


@pytest.fixture(scope="module")
def studio(home):
    with Studio(home) as s:
        yield s


FORM = {
    "groups": {"data": "local"},
    "values": {
        "model.path": "model",
        "data.path": "data.jsonl",
        "train.seq_len": "64",
        "data.cache_dir": "cache",
        "logging.progress_bar": "false",
        "sample.max_new_tokens": "8",
        "eval.every_steps": "20",
    },
}


def form(**values):
    return {"groups": FORM["groups"], "values": {**FORM["values"], **values}}


def cli(home, *args):
    return subprocess.run([CLI, *args], cwd=home, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_nothing_answers_without_the_token(studio):
    for path in ("/", "/api/form", "/api/runs"):
        assert studio.call(path, token=False, expect=401)["error"].startswith("no access token")
    refused = urllib.request.Request(studio.base + "/api/runs", headers={"X-Studio-Token": "guess"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(refused)
    assert e.value.code == 403
    with urllib.request.urlopen(studio.url) as r:  # the first visit sets the cookie later visits carry
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "<title>lora-launch studio" in r.read().decode()
    again = urllib.request.Request(studio.base + "/api/runs", headers={"Cookie": cookie.split(";")[0]})
    with urllib.request.urlopen(again) as r:
        assert r.status == 200


def test_form_validation_and_the_data_as_the_model_sees_it(studio, home):
    got = studio.call("/api/form")
    assert {g["name"] for g in got["groups"]} == {
        "model",
        "data",
        "lora",
        "quant",
        "optim",
        "distributed",
        "launcher",
        "logging",
        "preset",
    }
    lora_r = next(f for f in got["fields"] if f["key"] == "lora.r")
    assert (lora_r["type"], lora_r["default"], lora_r["range"]) == ("int", 8, ">= 1")

    bad = studio.call("/api/validate", form(**{"lora.r": "0"}), expect=400)["error"]
    line = cli(home, *studio.call("/api/validate", form())["overrides"], "lora.r=0", "run.dir=runs/never")
    assert line.returncode == 2 and line.stderr == f"error: {bad}\n" == "error: lora.r=0 must be >= 1\n"
    assert studio.call("/api/validate", form(**{"data.path": "/etc/passwd"}), expect=400)["error"].startswith(
        "data.path=/etc/passwd: outside the folders this studio may use"
    )
    good = studio.call("/api/validate", form(**{"lora.r": "4"}))
    assert good["command"].startswith("lora-launch data=local model.path=model") and good["values"]["lora.r"] == 4

    seen = studio.call("/api/data", form())
    assert (seen["total"], seen["kept"], seen["dropped"]) == (400, 400, 0) and sum(seen["histogram"]["counts"]) == 400
    tokens = seen["records"][0]["tokens"]
    masked = "".join(t["text"] for t in tokens if t["masked"])
    trained = "".join(t["text"] for t in tokens if not t["masked"])
    # data.template=auto is chatml for this tokenizer: the prompt is out of the loss, the answer in it
    assert "Reverse" in masked and "<|im_start|>assistant" in masked and "Reverse" not in trained
    assert seen["report"]["template"] == "chatml" and len(trained.split()) >= 3


def test_preview_is_what_the_command_line_prints(studio, home):
    shown = studio.call("/api/preview", form(**{"run.dir": "runs/p"}))
    printed = cli(home, *studio.call("/api/validate", form(**{"run.dir": "runs/p"}))["overrides"], "preview=true")
    assert printed.returncode == 0 and shown["text"] == printed.stdout and "accelerate launch" in shown["text"]
    assert shown["preview_command"].endswith(" run.dir=runs/p preview=true") and not (home / "runs" / "p").exists()


STEPS = "600"  # long enough to be stopped midway after the studio's restart, short enough to finish soon


def _wait(studio, run, done, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = studio.call(f"/api/run?dir={run}")
        if done(state):
            return state
        time.sleep(0.3)
    raise AssertionError(f"{run}: still {state['status']} at step {state['steps']}: {state['log'][-2000:]}")


def test_launch_watch_stop_resume_and_refusals(studio, home):
    launched = studio.call("/api/launch", form(**{"run.dir": "runs/s", "train.max_steps": STEPS}))
    assert launched["state"] == "running" and launched["run_dir"] == str(home / "runs" / "s")
    refused = studio.call("/api/launch", form(**{"run.dir": "runs/s", "train.max_steps": STEPS}), expect=409)
    assert re.match(r"run\.dir \S+runs/s is in use by a live launch \(pid \d+", refused["error"])

    studio.stop()  # the run goes on without the studio, which finds it again when reopened
    assert os.killpg(launched["pid"], 0) is None
    studio.__init__(home)
    live = _wait(studio, "runs/s", lambda s: s["steps"] > 0 and s["lr"] is not None)
    assert live["status"] == "running" and live["total_steps"] == int(STEPS) and live["tokens_per_s"] > 0
    assert live["train"][0][0] == 1 and live["eta_s"] is not None
    assert "runs/s" in [r["name"] for r in studio.call("/api/runs")["runs"]]

    assert "SIGTERM" in studio.call("/api/stop", {"dir": "runs/s"})["message"]
    stopped = _wait(studio, "runs/s", lambda s: s["status"] != "running")
    assert stopped["status"] == "preempted" and stopped["note"] == "SIGTERM" and stopped["steps"] < int(STEPS)
    assert (home / "runs" / "s" / "checkpoints" / f"step-{stopped['steps']}").is_dir()
    assert "stopped by SIGTERM with a checkpoint" in stopped["log"]
    studio.call("/api/stop", {"dir": "runs/s"}, expect=409)

    studio.call("/api/resume", {"dir": "runs/s"})
    finished = _wait(studio, "runs/s", lambda s: s["status"] == "finished")
    assert finished["steps"] == finished["evals"][-1][0] == int(STEPS)
    n, log = stopped["steps"], next((home / ".studio").glob("s-*/launch.log")).read_text()
    assert re.search(rf"checkpoint: resumed from \S+/runs/s/checkpoints/step-{n} \(step {n},", log)
    rows = {r["name"]: r for r in studio.call("/api/runs?sort=-date")["runs"]}
    assert rows["runs/s"]["status"] == "finished" and rows["runs/s"]["adapter"] == "runs/s/adapter"
    assert studio.call("/api/launch", form(**{"run.dir": "../out"}), expect=400)["error"].startswith("run.dir=../out:")

    served = studio.call("/api/serve", {"dir": "runs/s"})
    assert served["model"] == "s" and served["url"].startswith("http://127.0.0.1:")
    answer = studio.call("/api/ask", {"dir": "runs/s", "prompt": "Reverse: cat dog sun", "max_tokens": 4})
    assert answer["model"] == "s" and answer["usage"]["completion_tokens"] >= 1
    studio.call("/api/serve/stop", {"dir": "runs/s"})


def test_the_page_renders_the_generated_form_in_chromium(studio):
    dom = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=15000",
            "--dump-dom",
            studio.url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for group in ("model", "data", "lora", "quant", "optim", "distributed", "launcher", "logging", "preset"):
        assert f'id="g-{group}"' in html, group
    assert 'id="f-lora.r"' in html and 'id="f-optim.lr"' in html and "&gt;= 1" in html
    assert re.search(r'<input type="radio" name="format" data-key="data.format" value="instruction">', html)
    assert "error:" not in re.sub(r"<script.*?</script>", "", html, flags=re.S)
