//! Development tools: a local API Gateway WebSocket stand-in and a WebSocket load client (placeholder).
