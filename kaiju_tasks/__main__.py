"""``python -m kaiju_tasks``: the ``kaiju-tasks`` command."""

from __future__ import annotations

import sys

from kaiju_tasks.cli import main

sys.exit(main())
