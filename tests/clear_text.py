"""Whether an identifier shows in clear in a text: as a whole token, not as letters inside a longer one.

A short customer id such as "c3" is also two characters of many a hex pseudonym, ULID or base64 token, so
a plain substring test fails by chance on some runs; a token is a run of letters, digits, `_` and `-`.
"""

import re


def in_clear(identifier: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_-]){re.escape(identifier)}(?![A-Za-z0-9_-])", text) is not None
