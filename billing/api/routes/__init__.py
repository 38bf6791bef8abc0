"""The `/_billing` routes, one module per resource."""
