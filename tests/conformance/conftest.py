"""Every conformance test runs once per backend (engine.BACKENDS), each on its own database."""
from __future__ import annotations

from contextlib import ExitStack

import pytest

from tests import pooler
from tests.conformance.engine import BACKENDS, Engine


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def engine(request, db_url, tmp_path):
    backend = request.param
    with ExitStack() as stack:
        url = db_url
        if backend.pooled:
            if not pooler.INSTALLED:
                pytest.skip(pooler.WHY_NOT)
            url = stack.enter_context(pooler.pgbouncer(db_url, tmp_path))
        e = Engine(backend, url, db_url)
        stack.callback(e.close)
        yield e
