"""Small shared helpers, one of each: atomic file writes (io), seeds (seeding), config range checks (checks)."""
