"""Generated gRPC stubs of the kairoi API (proto/kairoi/...)."""
