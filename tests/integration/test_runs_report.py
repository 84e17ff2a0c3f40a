"""The repository of runs after real training: a tiny sweep and a run trained by the installed `lora-launch`,
then `lora-launch runs`, `runs diff` and `report` run from the directory that holds them, and the report
opened in a real headless Chromium (its table rendered, sorted by the URL and by clicking a column)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from support.cli import CLI, read_jsonl, subprocess_env

INSTALL = "apt-get install -y chromium  (as root; `make test` does it on Debian/Ubuntu)"


def chromium() -> str:
    """The Chromium binary; the test fails (never skips) without one, saying how to install it."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail(f"the report's test needs a headless Chromium and none is installed: {INSTALL}", pytrace=False)


def browse(url: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *flags, url],
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli(cwd, *args, ok=True) -> subprocess.CompletedProcess:
    out = subprocess.run([CLI, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A 2-trial sweep (lora.r=4,8, side by side) and one run (lora.r=16, another lr), 4 steps each,
    plus a half-written run and a killed one next to them."""
    home = tmp_path_factory.mktemp("repo")
    common = [*tiny["overrides"], "train.max_steps=4", "eval.every_steps=2", f"data.cache_dir={home / 'cache'}"]
    cli(home, "-m", *common, "lora.r=4,8", "sweep.parallel=2")
    cli(home, *common, "lora.r=16", "optim.lr=3e-3", "run.dir=runs/base")
    broken = home / "runs" / "half-written"
    broken.mkdir()
    (broken / "config.yaml").write_text("model:\n  name: [tin")
    killed = home / "runs" / "killed"
    killed.mkdir()
    shutil.copy(home / "runs" / "base" / "config.yaml", killed)
    (killed / "status.json").write_text(json.dumps({"state": "running", "step": 2, "time": 1.0}))
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    return home


def best_eval(run_dir) -> float:
    return min(r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r)


def test_runs_lists_sorts_filters(trained):
    sweep = next((trained / "sweeps").iterdir())
    listed = {r["name"]: r for r in json.loads(cli(trained, "runs", "--json").stdout)}
    trials = {f"sweeps/{sweep.name}/lora.r={r}": r for r in (4, 8)}
    assert set(listed) == {"runs/base", "runs/half-written", "runs/killed", *trials}
    assert {n: listed[n]["status"] for n in listed} == {
        "runs/base": "finished",
        "runs/half-written": "broken",
        "runs/killed": "killed",
        **{t: "finished" for t in trials},
    }
    for name, row in listed.items():
        if row["status"] == "finished":
            assert row["best_eval_loss"] == best_eval(trained / name) and row["steps"] == 4
            assert (trained / row["adapter"] / "adapter_model.safetensors").is_file()
    assert [listed[t]["r"] for t in trials] == [4, 8] and listed["runs/base"]["lr"] == 3e-3

    table = cli(trained, "runs", "--sort", "eval_loss", "--where", "status=finished").stdout.splitlines()
    finished = sorted((n for n in listed if listed[n]["status"] == "finished"), key=lambda n: best_eval(trained / n))
    assert [line.split()[0] for line in table[1:]] == finished
    assert table[0].split()[:4] == ["name", "status", "steps", "model"]
    only = cli(trained, "runs", "--where", "status=finished", "--where", "lora.r=4").stdout.splitlines()
    assert len(only) == 2 and only[1].startswith(f"sweeps/{sweep.name}/lora.r=4 ")
    full = cli(trained, "runs").stdout
    assert "config.yaml is not valid YAML" in full and "no process holds the run dir" in full

    bad = cli(trained, "runs", "--sort", "colour", ok=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown key 'colour'" in bad.stderr
    (trained / "nothing").mkdir(exist_ok=True)
    empty = cli(trained, "runs", "nothing").stdout
    assert empty == "no runs under nothing (a run dir holds config.yaml, status.json or metrics.jsonl)\n"


def test_runs_diff(trained):
    out = cli(trained, "runs", "diff", "runs/base", "lora.r=8").stdout
    config = dict(re.findall(r"^(\S+)\s+(\S+\s+\S+)$", out.split("\nresult")[0], re.M))
    assert config.pop("config").split() == ["A", "B"]
    assert config["lora.r"].split() == ["16", "8"] and config["optim.lr"].split() == ["0.003", "0.002"]
    assert "run.dir" not in out and "train.max_steps" not in out
    rows = {line.split()[0]: line.split()[1:] for line in out.split("\nresult")[1].splitlines()[1:] if line}
    assert set(rows) == {
        "final_eval_loss",
        "best_eval_loss",
        "final_train_loss",
        "tokens_per_s",
        "steps",
        "peak_memory_gib",
    }
    sweep = next((trained / "sweeps").iterdir())
    assert float(rows["best_eval_loss"][1]) == pytest.approx(best_eval(sweep / "lora.r=8"), abs=1e-3)
    assert rows["steps"][:2] == ["4", "4"]
    missing = cli(trained, "runs", "diff", "runs/base", "nope", ok=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: runs: nope: no such run dir")


def test_report_renders_in_a_headless_browser(trained):
    out = cli(trained, "report").stdout
    page = trained / "report.html"
    assert out.startswith("wrote report.html: 5 runs") and page.is_file()
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "<link" not in html
    # the curves of the 4 runs with metrics (the half-written one: "nothing to plot"), one swept key
    assert html.count("<svg") == 4 + 1 and "best eval loss against lora.r" in html
    url = page.as_uri()

    dom = browse(url + "#sort=-best_eval_loss", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = re.findall(r'<tr data-name="([^"]+)"', dom.stdout)
    named = [n for n in shown if n.startswith(("runs/base", "sweeps/"))]
    assert named == sorted(named, key=lambda n: -best_eval(trained / n)) and len(shown) == 5
    assert set(shown[-2:]) == {"runs/half-written", "runs/killed"}  # no eval loss: last either way
    assert 'aria-sort="descending"' in dom.stdout

    harness = trained / "click.html"  # clicks the best-eval header twice inside the page, reports the order
    harness.write_text("""<!doctype html><pre id="order"></pre><iframe id="f" src="report.html"></iframe><script>
const f = document.getElementById('f');
f.onload = () => {
  const doc = f.contentDocument, th = doc.querySelector('th[data-key="best_eval_loss"]');
  const show = () => [...doc.querySelectorAll('#runs tbody tr')].map(r => r.dataset.name).join(' ');
  th.click();
  setTimeout(() => { const up = show(); th.click();
    setTimeout(() => { document.getElementById('order').textContent = up + ' | ' + show(); }, 300); }, 300);
};</script>""")
    clicked = browse(harness.as_uri(), "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom")
    up, down = re.search(r'<pre id="order">(.*?) \| (.*?)</pre>', clicked.stdout).groups()
    assert up.split()[:3] == named[::-1] and down.split()[:3] == named

    shot = trained / "shot.png"
    done = browse(url, "--window-size=1280,900", f"--screenshot={shot}")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    from PIL import Image  # matplotlib's dependency

    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert image.size == (1280, 900), image.size
    assert len(colours) > 20, colours  # text, badges and lines, not a blank page
