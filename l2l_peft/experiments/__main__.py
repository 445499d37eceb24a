"""`accelerate launch -m l2l_peft.experiments CONFIG.yaml --output runs/NAME` (or `python -m`)."""

import sys

from ..extras import exit_without

exit_without("experiments", "python -m l2l_peft.experiments")

from .runner import main

sys.exit(main())
