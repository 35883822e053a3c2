"""Fleet issuance: one stained or locked copy per customer, recorded in a registry of issued copies."""
