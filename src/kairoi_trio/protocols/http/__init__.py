"""The HTTP server: probes, the JSON API (/api/v1) and room for a dashboard."""
