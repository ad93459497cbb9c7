from tests.ingest.conftest import token

__all__ = ["token"]  # a fixture: device dev-1 of tenant t1, for the ingest routes
