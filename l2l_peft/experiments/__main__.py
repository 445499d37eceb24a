"""`accelerate launch -m l2l_peft.experiments CONFIG.yaml --output runs/NAME` (or `python -m`)."""

from ..extras import exit_without
from ..runtime import exit_process

exit_without("experiments", "python -m l2l_peft.experiments")

from .runner import main

exit_process(main())
