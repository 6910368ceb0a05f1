"""Development tools for this checkout (not shipped): run the services as local processes."""
