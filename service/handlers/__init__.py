"""HTTP and WebSocket handlers: each orders the steps of one route and owns no policy."""
