"""Generated gRPC stubs for the hetis.v1 package. Regenerate with `make protos`."""
