"""`python -m lora_launch.cli`: the `lora-launch` console script (what a sweep's trials and the studio run)."""

import sys

from lora_launch.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
