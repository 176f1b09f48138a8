"""remote-proxy: the tunnel listener, its WebSocket adapter and the token verifiers."""
