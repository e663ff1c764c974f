"""A test app package. Kept import-free: the master locates `markerpkg.main`, which imports this."""
