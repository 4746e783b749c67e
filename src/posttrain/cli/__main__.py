"""`python -m posttrain.cli ...`: the `posttrain` command (as `accelerate launch -m posttrain.cli` runs it)."""

import sys

from posttrain.cli import main

sys.exit(main())
