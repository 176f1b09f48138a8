"""Interop tests: visiona_tunnel.yamux against a real hashicorp/yamux peer written in Go."""
