"""A value that would become a line of a script is refused as the user meets it: the installed `lora-launch` in a
temp dir exits 2 with one `error:` line naming the key, writes no sbatch script and runs nothing."""

from __future__ import annotations

import pytest

from support.cli import lora_launch


@pytest.mark.parametrize(
    "override,key",
    [
        ('launcher.slurm.extra=["--exclusive\ntouch pwned"]', "launcher.slurm.extra[0]"),
        ('launcher.slurm.partition="gpu\ntouch pwned"', "launcher.slurm.partition"),
    ],
)
def test_a_newline_in_a_slurm_value_is_refused(tmp_path, override, key):
    done = lora_launch(
        "launcher=slurm", "launcher.slurm.submit=false", "run.dir=runs/sl", override, cwd=tmp_path, timeout=300
    )
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == done.stderr.splitlines()[-1:] and len(errors) == 1, done.stderr
    assert errors[0].startswith(f"error: {key}=") and "holds the control character '\\n'" in errors[0]
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.rglob("slurm.sbatch")) and not list(tmp_path.rglob("pwned"))
    assert not (tmp_path / "runs" / "sl").exists()
