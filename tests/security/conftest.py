"""The dashboard's fixtures for the security tests: the app, a client, tokens and sessions
(from tests/integration/test_dashboard_http.py) and the real browser (tests/browser)."""

from __future__ import annotations

from tests.browser import conftest as browser_fixtures
from tests.integration import test_dashboard_http as http

app = http.app
client = http.client
tokens = http.tokens
sessions = http.sessions
browser = browser_fixtures.browser
site = browser_fixtures.site
