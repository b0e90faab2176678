"""`dvcr-importer`: one import per run (placeholder until the importers land)."""
