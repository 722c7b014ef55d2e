"""Repository-wide pytest settings.

Under CI (``CI`` set), hypothesis runs derandomized: the same examples every
run, so a submission's result does not depend on luck. Locally it explores
new examples each run, which is how it finds bugs.
"""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
