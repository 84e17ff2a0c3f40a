"""How bench.save_pause sums up a run's saves: the first save (which pins its buffers) apart, the commit that
ended an arm left out of the commit figures, the disk's waits apart from training's pause. Made-up rows, no
training."""

from __future__ import annotations

import pytest

from support.bench import bench_module

save_pause = bench_module("save_pause")


def _save(step: int, pause: float, commit: float, extra: float | None, first=False, at_end=False, writer=0.0):
    total = pause + commit + max(extra or 0.0, 0.0)
    return {
        "arm": "pinned",
        "save_step": step,
        "pause_ms": pause,
        "commit_ms": commit,
        "writer_wait_ms": writer,
        "committed_by_next_save": writer > 0,
        "at_end": at_end,
        "next_step_extra_ms": extra,
        "first": first,
        "pause_total_ms": total,
        "step_median_ms": 200.0,
        "write_s": 1.0,
        "bytes": 512 * 2**20,
    }


def test_the_summary_leaves_out_the_first_save_and_the_last_commit():
    saves = [
        _save(5, 300.0, 5.0, 1.0, first=True),  # pins its buffers
        _save(10, 4.0, 6.0, -2.0, writer=120.0),  # committed by the next save, after waiting for its writer
        _save(15, 6.0, 4.0, 2.0),
        _save(20, 5.0, 900.0, None, at_end=True),  # the arm's end waited for its writer
    ]
    s = save_pause.summary("pinned", saves)
    assert s["first_save_pause_ms"] == 300.0
    assert s["pause_ms_median"] == 5.0 and s["pause_ms_max"] == 6.0
    assert s["commit_ms_median"] == 5.0 and s["commit_ms_max"] == 6.0  # not the 900 ms at the end
    assert s["commits_by_the_next_save"] == 1 and s["writer_wait_ms_max"] == 120.0
    assert s["mib"] == 512 and s["write_s_median"] == 1.0
    assert s["cost_every_25_steps"] == pytest.approx(s["pause_total_ms_median"] / (25 * 200.0))
    assert "pinned: step 200.0 ms; pause at the save 5.0 ms" in save_pause.line(s)


def test_a_summary_of_one_save_or_none_still_reads():
    s = save_pause.summary("at_once", [_save(5, 800.0, 0.0, None, first=True)])
    assert s["pause_ms_median"] == 800.0 and s["next_step_extra_ms_median"] is None
    assert "next step - ms" in save_pause.line(s)
    empty = save_pause.summary("blocking", [])
    assert empty["saves"] == 0 and empty["cost_every_25_steps"] is None
    assert "blocking: step - ms" in save_pause.line(empty)
