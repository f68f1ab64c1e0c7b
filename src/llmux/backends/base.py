"""The backend seam, as backends name it: the protocol is the scheduler's own
(``llmux.scheduling.launcher``: the scheduler acts only through it) and ``ProcessLauncher``
implements it. Tests of the scheduler core use a recorder instead; process tests use the real
``ProcessLauncher``.
"""

from __future__ import annotations

from llmux.errors import LaunchFailed as LaunchFailed
from llmux.scheduling.launcher import Child as Child
from llmux.scheduling.launcher import Launcher as Launcher
from llmux.scheduling.launcher import LaunchSpec as LaunchSpec
