"""Where artifacts and records live: a local directory or any fsspec URL (DESIGN §4)."""

from storage.errors import DomainError
from storage.population import Claim, PopulationStore, Problem, StatusReport
from storage.store import STORE_FORMAT, Store, StoreError, check_name, resolve_store_url

__all__ = ["Claim", "DomainError", "PopulationStore", "Problem", "STORE_FORMAT", "StatusReport", "Store", "StoreError",
           "check_name", "resolve_store_url"]
