"""The launch's stderr relay: the ranks' lines pass, the launcher tracebacks after a failed rank do not."""

from __future__ import annotations

import io

from lora_launch.launcher.relay import StderrRelay

ACCELERATE_TB = """Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/accelerate/commands/launch.py", line 1423, in <module>
    main()
  File "/venv/lib/python3.11/site-packages/accelerate/commands/launch.py", line 786, in simple_launcher
    raise subprocess.CalledProcessError(returncode=process.returncode, cmd=cmd)
subprocess.CalledProcessError: Command '['python', '-m', 'lora_launch.train']' returned non-zero exit status 2.
"""
TORCHRUN = """E1129 02:58:18.072000 16510 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2)
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1019, in run
    elastic_launch(
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
lora_launch.train FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
============================================================
"""
RANK_BUG = """Traceback (most recent call last):
  File "/repo/train/loop.py", line 12, in fit
    x = 1 / 0
ZeroDivisionError: division by zero
"""


def relay(text: str, verbose: bool = False) -> tuple[str, list[str]]:
    out = io.StringIO()
    r = StderrRelay(io.BytesIO(text.encode()), out, verbose=verbose).start()
    r.join()
    return out.getvalue(), r.errors


def test_a_ranks_error_line_is_all_that_is_left():
    text = "error: data.jsonl:2: not valid JSON\n" + ACCELERATE_TB
    assert relay(text) == ("error: data.jsonl:2: not valid JSON\n", ["error: data.jsonl:2: not valid JSON"])
    peer = '[rank1]: Traceback (most recent call last):\n[rank1]:   File "x.py", line 1\n[rank1]: RuntimeError: peer\n'
    assert relay("error: bad\n" + peer + TORCHRUN + "after\n")[0] == "error: bad\nafter\n"


def test_a_ranks_own_traceback_passes_and_verbose_passes_everything():
    assert relay("warming up\n" + RANK_BUG + ACCELERATE_TB)[0] == "warming up\n" + RANK_BUG
    assert relay(RANK_BUG + ACCELERATE_TB, verbose=True)[0] == RANK_BUG + ACCELERATE_TB
    # verbose shows every rank's copy of a refusal, and still counts it: a refusal is never restarted
    refusal = "error: cannot resume from RUN/checkpoints/step-2: data\n"
    assert relay(refusal + refusal + TORCHRUN, verbose=True) == (refusal + refusal + TORCHRUN, [refusal.strip()] * 2)


def test_one_refusal_from_every_rank_is_one_line_and_a_chained_traceback_goes_whole():
    refusal = "error: cannot resume from RUN/checkpoints/step-2: data\n"
    chained = (
        '[rank1]: Traceback (most recent call last):\n[rank1]:   File "x.py", line 1\n[rank1]: OSError: gone\n'
        "[rank1]: \n[rank1]: The above exception was the direct cause of the following exception:\n"
        '[rank1]: \n[rank1]: Traceback (most recent call last):\n[rank1]:   File "y.py", line 2\n'
        "[rank1]: RuntimeError: peer closed\n"
    )
    out, errors = relay(refusal + refusal + chained + TORCHRUN)
    assert out == refusal and len(errors) == 2
    # a rank's own chained traceback passes whole, and so does an unrelated traceback after it
    assert relay(chained + RANK_BUG + ACCELERATE_TB)[0] == chained + RANK_BUG


# accelerate 1.16 raises CalledProcessError from a RuntimeError holding the rank's last stderr line: Python
# prints that cause bare (no traceback of its own) before the chained traceback
ACCELERATE_116 = (
    """error: boom
RuntimeError: error: boom


The above exception was the direct cause of the following exception:

"""
    + ACCELERATE_TB
)


def test_accelerate_116s_bare_cause_and_its_chain_are_dropped_after_the_ranks_error_line():
    shown, errors = relay(ACCELERATE_116)
    assert shown == "error: boom\n" and errors == ["error: boom"]


def test_a_bare_exception_line_that_starts_no_chain_still_passes():
    text = "ValueError: a rank's own message\nstep 3: loss 1.0\n"
    assert relay(text)[0] == text
