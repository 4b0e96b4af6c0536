"""`featurecache serve`: the service (runs loaded once, rows for uploads), the fleet of runs, the HTTP
server (FastAPI) and its page (web, static/), and the token (auth)."""
