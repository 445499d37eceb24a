"""`accelerate launch -m l2l_peft.experiments CONFIG.yaml --output runs/NAME` (or `python -m`)."""

from ..environment import exit_process
from .runner import main

exit_process(main())
