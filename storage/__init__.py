"""Where artifacts and records live: a local directory or any fsspec URL (DESIGN §4)."""

from storage.errors import DomainError
from storage.population import Claim, PopulationStore, Problem, StatusReport
from storage.store import LAYOUT_VERSION, Store, StoreError, check_name, resolve_store_url

__all__ = ["Claim", "DomainError", "LAYOUT_VERSION", "PopulationStore", "Problem", "StatusReport", "Store", "StoreError",
           "check_name", "resolve_store_url"]
