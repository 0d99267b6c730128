"""OEF allocator service: `python -m services.allocator --help` (docs/allocator.md)."""
