"""schemathesis hooks for tests/e2e/test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

The document marks event ids with the custom format `printable` (Python's str.isprintable: a rule
of Unicode categories that a portable regex cannot state). This teaches schemathesis to generate
such strings, so that its "valid" event ids are valid for the server too.
"""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

NOT_PRINTABLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")  # str.isprintable() is False for these...
PRINTABLE = st.characters(exclude_categories=NOT_PRINTABLE, include_characters=" ")  # ...but for the space

schemathesis.openapi.format("printable", st.text(PRINTABLE, min_size=1, max_size=128))
