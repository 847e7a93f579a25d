"""Accept header values for the schema and header tests (imported, not a conftest):
what scrapers send, what prometheus_client could not parse, and any text."""

from __future__ import annotations

import re

from hypothesis import strategies as st

# The ones that answered 500: prometheus_client compares versions as tuples of
# ints and strings.
MALFORMED = [
    "application/openmetrics-text; version=abc",
    "application/openmetrics-text; version=1.a",
    "application/openmetrics-text; version=1..0",
    "application/openmetrics-text; version=.",
    "application/openmetrics-text; version= 1\x0b.0\x1c.0",  # int() strips these
    "text/plain; version=x.y",
    "text/plain; version=1..0; escaping=nonsense",
]
WELL_FORMED = [
    "application/openmetrics-text",
    "application/openmetrics-text; version=",
    "application/openmetrics-text; version=1.0.0.x",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text; version=0.0.1",
    "application/openmetrics-text; version=2.0.0; escaping=allow-utf-8",
    "text/plain; version=0.0.4",
    "text/plain; version=1.0.0; escaping=dots",
    "*/*",
    "application/json",
]
# Text as httpx (the TestClient) sends it in a header: ASCII, control
# characters, CR and LF included; and raw bytes, which it sends as they are.
ASCII = st.text(st.characters(max_codepoint=0x7F), max_size=60)


def _accept(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(MALFORMED + WELL_FORMED),
        text,
        text.map(lambda v: f"application/openmetrics-text; version={v}"),
        text.map(lambda v: f"text/plain; version={v}"),
        st.lists(st.sampled_from(MALFORMED + WELL_FORMED), min_size=2, max_size=3).map(", ".join),
    )


ACCEPT: st.SearchStrategy[str | bytes] = st.one_of(_accept(ASCII), st.binary(max_size=60))

# What `requests` (schemathesis's client) agrees to send: no CR or LF, no
# leading white space.
_REQUESTS_VALUE = re.compile(r"\S[^\r\n]*|")
ACCEPT_FOR_REQUESTS: st.SearchStrategy[str] = _accept(ASCII).filter(
    lambda v: _REQUESTS_VALUE.fullmatch(v) is not None
)
