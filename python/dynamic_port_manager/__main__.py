"""``python -m dynamic_port_manager``: the command line."""

import sys

from .cli import main

sys.exit(main())
