"""Tests of visiona_services (the remote-proxy and the api-server)."""
