"""`accelerate launch -m l2l_peft.experiments CONFIG.yaml --output runs/NAME` (or `python -m`)."""

import sys

from .runner import main

sys.exit(main())
