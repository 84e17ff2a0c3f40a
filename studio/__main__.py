"""`lora-launch studio [--host H] [--port P] [--root DIR] [--allow-path DIR]` runs `python -m lora_launch.studio`."""

from __future__ import annotations

import sys

from lora_launch.studio.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
