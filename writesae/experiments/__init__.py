"""The paper's protocols, written once against the host API (any host that implements it)."""
