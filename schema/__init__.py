"""Data package: the daemon DB schemas and the manifest JSON Schema, shipped with incstore."""
