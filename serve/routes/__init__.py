"""The service's routes, one module per resource: `oip` (the v2 protocol), `classify` (v1), `metrics`."""
